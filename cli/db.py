"""dn db: the platform database's schema migrations and status."""
from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(help="The platform database: schema migrations and status.", no_args_is_help=True)


@app.command()
def init(
    ctx: typer.Context,
    bootstrap_dsn: Optional[str] = typer.Option(
        None, "--bootstrap-dsn", metavar="DSN",
        help="a role that may create roles (superuser), used once to create dn's NOLOGIN roles; "
             "password from database.passfile, never in the DSN"),
) -> None:
    """Apply the pending schema migrations as the owner role (database.admin_dsn). Idempotent; audited."""
    from dn import audit, db
    from dn.errors import DnError

    c = ctx.obj
    if bootstrap_dsn:
        db.check_dsn(bootstrap_dsn, "--bootstrap-dsn")
    args: dict = {"target": db.describe_dsn(c.settings.database.admin_dsn or c.settings.database.dsn),
                  "bootstrap_roles": bool(bootstrap_dsn)}
    # Migrate first, then audit: before the first migration there is no audit log to write to.
    try:
        applied = db.migrate(c.settings.database, bootstrap_dsn=bootstrap_dsn,
                             audit_retention_days=c.settings.retention.audit_days)
    except BaseException as e:
        outcome, code = audit.outcome_of(e)
        try:
            audit.record(c, "db init", args, outcome=outcome, exit_code=code)
        except DnError as audit_error:
            c.err.print(f"[yellow]warning:[/] 'db init' was not audited: {audit_error.message}", soft_wrap=True)
        raise
    args["applied"] = [m.filename for m in applied]
    audit.record(c, "db init", args)
    for m in applied:
        c.out(f"applied {m.filename}")
    c.err.print(f"database {args['target']}: schema up to date ({len(applied)} migration(s) applied now)", soft_wrap=True)


@app.command()
def status(ctx: typer.Context, json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Show the database, its applied and pending migrations, the audit chain head and held locks.
    Exits 4 when migrations are pending."""
    from dn import db
    from dn.errors import DriftFound

    c = ctx.obj
    st = db.status(c.settings.database)
    if json:
        c.out_json(st.to_dict())
    else:
        c.out(f"database:     {st.target} (PostgreSQL {st.server_version}, connected as {st.role})")
        for a in st.applied:
            c.out(f"applied:      {a.version:03d}_{a.name}.sql  {a.applied_at:%Y-%m-%d %H:%M:%S%z} by {a.applied_by}")
        for p in st.pending:
            c.out(f"pending:      {p}")
        c.out(f"audit head:   {'#' + str(st.audit_head) if st.audit_head is not None else '-'}")
        c.out(f"locks held:   {st.locks_held if st.locks_held is not None else '-'}")
    if st.pending:
        raise DriftFound(f"{len(st.pending)} migration(s) pending: {', '.join(st.pending)}",
                         hint="run `dn db init`", where="database")
