"""dn audit: the append-only, hash-chained audit log of privileged actions."""
from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(help="The audit log of privileged actions: show, verify, prune, key.", no_args_is_help=True)


@app.command()
def show(
    ctx: typer.Context,
    since: Optional[str] = typer.Option(None, "--since", metavar="DATE|DURATION",
                                        help="from a date/time (2026-01-31, 2026-01-31T12:00Z) or a duration back (90m, 12h, 7d, 2w)"),
    tenant: Optional[str] = typer.Option(None, "--tenant", help="only entries about this tenant"),
    json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Print the audit entries, oldest first."""
    from datetime import datetime, timezone

    from dn import audit

    c = ctx.obj
    start = audit.parse_since(since, datetime.now(timezone.utc)) if since else None
    entries = audit.show(c, since=start, tenant=tenant)
    if json:
        c.out_json([e.to_dict() for e in entries])
        return
    if not entries:
        c.err.print("no audit entries", soft_wrap=True)
        return
    for e in entries:
        where = " ".join(f"{k}={v}" for k, v in (("tenant", e.tenant), ("host", e.host)) if v)
        c.out(f"#{e.seq:<6} {e.at.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S}Z  {e.actor}  {e.command}"
              f"{'  ' + where if where else ''}  {e.outcome}({e.exit_code})  req={e.request_id}")


@app.command()
def verify(
    ctx: typer.Context,
    json: bool = typer.Option(False, "--json", help="print JSON"),
    no_witness: bool = typer.Option(False, "--no-witness",
                                    help="ignore this machine's witness file (after a restore); the second "
                                         "region's witness is always checked"),
) -> None:
    """Check the hash chain, the signed anchors (against audit.anchor_keys), the chain head, the
    newest witness in the second region and this machine's witness. Exits 4 and names every entry
    when tampering is found, 2 when audit.anchor_keys or the second region is not configured."""
    from dn import audit
    from dn.errors import ConfigError, PolicyViolation

    c = ctx.obj
    result = audit.verify(c, use_witness=not no_witness)
    if json:
        c.out_json(result.to_dict())
    else:
        start = f"anchor #{result.anchor.anchor_seq}" if result.anchor else "the start"
        c.out(f"checked {result.checked} entries from {start} to #{result.last_seq}"
              f" (head #{result.head_seq}, {result.anchors} anchor(s))")
        rw = result.region_witness
        c.out(f"second region's witness: #{rw.seq} of {rw.witnessed_at}" if rw else "second region's witness: none yet")
        if result.recorded:
            c.out(f"witness #{result.recorded.seq} added to the second region")
        for p in result.problems:
            c.out(f"{'UNVERIFIED' if p.kind == 'unverified' else 'TAMPERED'} {p.kind:13} {p}")
        if result.ok:
            c.out("audit log intact")
    if result.ok:
        return
    if all(p.kind == "unverified" for p in result.problems):
        raise ConfigError("audit log not verified: " + "; ".join(p.detail for p in result.problems),
                          hint=audit.UNVERIFIED_HINT)
    raise PolicyViolation(f"audit log verification failed: {len(result.problems)} problem(s)",
                          runbook="incident-response#detection", where="audit")


@app.command()
def prune(
    ctx: typer.Context,
    dry_run: bool = typer.Option(False, "--dry-run", help="show what would be pruned, change nothing"),
    json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Remove entries older than retention.audit_days, after writing a signed anchor. Audited."""
    from dn import audit

    c = ctx.obj
    days = c.settings.retention.audit_days
    if not dry_run:
        audit.require_signing_key(c.settings)  # before anything is locked or written
    if dry_run:
        result = audit.prune(c, days, dry_run=True)
    else:
        with audit.privileged(c, "audit prune", {"older_than_days": days}, lock=["audit:prune"]) as op:
            result = audit.prune(c, days)
            op.args.update(pruned=result.count, first_seq=result.first_seq, last_seq=result.last_seq)
    if json:
        c.out_json(result.to_dict())
    elif result.count == 0:
        c.out(f"nothing older than {days} days (before {result.cutoff:%Y-%m-%d %H:%M}Z)")
    else:
        verb = "would prune" if dry_run else "pruned"
        c.out(f"{verb} {result.count} entries #{result.first_seq}..#{result.last_seq} older than {days} days"
              + ("" if dry_run else f"; anchor signed by {audit.key_fingerprint(result.anchor.public_key)}"))


@app.command()
def key(ctx: typer.Context, json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Print this machine's anchor key as audit.anchor_keys spells it (made on first use, mode 0600).
    Pin it in the configuration of every machine that verifies the log: [audit] anchor_keys = ["ed25519:..."]."""
    from dn import audit

    c = ctx.obj
    public = audit.public_key_b64(audit.anchor_key(c.settings))
    pinned = public in audit.trusted_anchor_keys(c.settings)
    if json:
        c.out_json({"key": audit.pinned_key(public), "fingerprint": audit.key_fingerprint(public),
                    "path": str(audit.anchor_key_path(c.settings)), "pinned": pinned})
        return
    c.out(audit.pinned_key(public))
    if not pinned:
        c.err.print("not pinned here yet: add it to [audit] anchor_keys (or DN__AUDIT__ANCHOR_KEYS)", soft_wrap=True)


@app.command("accept-restore")
def accept_restore(ctx: typer.Context, json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """After restoring the platform database from a backup: record in the second region (signed,
    a new file) that the entries after the restored chain's head, which an earlier witness saw,
    were lost with the restore. Refuses unless that is the chain's only problem. Audited."""
    from dn import audit

    c = ctx.obj
    audit.require_signing_key(c.settings)
    with audit.privileged(c, "audit accept-restore", {}, lock=["audit:prune"]) as op:
        record = audit.accept_restore(c)
        op.args.update(restored_to=record.seq, lost_up_to=record.lost_seq)
    if json:
        c.out_json(record.to_dict())
    else:
        c.out(f"recorded in the second region: the chain restored to #{record.seq}; "
              f"entries #{record.seq + 1}..#{record.lost_seq} were lost with the restore")
