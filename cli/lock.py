"""dn lock: the tenant and host locks of privileged operations."""
from __future__ import annotations

import typer

app = typer.Typer(help="Tenant and host locks: who holds them, and breaking a crashed run's lock.",
                  no_args_is_help=True)


@app.command("list")
def list_(ctx: typer.Context, json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """List the held locks: holder, since when, and whether the holder is alive (else: stale, and
    whether its holder is provably dead, so that the next run takes the lock over)."""
    from dn import db, locks

    c = ctx.obj
    bound = c.settings.database.lock_stale_after
    with db.connect(c.settings.database, application_name="dn lock list") as conn:
        held = locks.list_locks(conn)
    if json:
        c.out_json([{**h.to_dict(), "holder_dead": h.dead(bound)} for h in held])
        return
    if not held:
        c.err.print("no locks held", soft_wrap=True)
        return
    for h in held:
        dead = h.dead(bound)
        note = f"  (holder dead: {dead}; the next run takes it over)" if dead else ""
        c.out(f"{h.resource:28} {'held ' if h.alive else 'STALE'}  {h.describe()}{note}")


@app.command("break")
def break_(ctx: typer.Context, resource: str = typer.Argument(..., help="tenant:SLUG or host:NAME (see `dn lock list`)")) -> None:
    """Remove a stale lock left by a run that died. A live holder's lock is never broken. Audited.

    Needed only when the holder cannot be proved dead (its process still runs, or runs elsewhere
    and the lock is younger than database.lock_stale_after): a dead holder's lock is taken over
    by the next run."""
    from dn import audit, db, locks

    c = ctx.obj
    res = locks.parse_resource(resource)
    kind, name = res.split(":", 1)
    with audit.privileged(c, "lock break", {"resource": res}, tenant=name if kind == "tenant" else None,
                          host=name if kind == "host" else None, lock=False) as op:
        with db.connect(c.settings.database, application_name=f"dn lock break {c.request_id}") as conn:
            h = locks.break_lock(conn, res)
        op.args["holder"] = {k: v for k, v in h.to_dict().items()
                             if k in ("actor", "command", "request_id", "pid", "machine", "since")}
    c.err.print(f"broke the stale lock on {res} held by {h.describe()}", soft_wrap=True)
