"""dn backup: encrypted backups of the platform database (or one tenant) in the second EU region."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Backups to the second EU region: run, list, prune, shred.", no_args_is_help=True)


def _human_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _human_age(seconds: int) -> str:
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.0f}d"


@app.command("run")
def run_(
    ctx: typer.Context,
    tenant: Optional[str] = typer.Option(None, "--tenant", "-t", help="back up only this tenant's rows (its own key)"),
    platform: bool = typer.Option(False, "--platform", help="back up the whole platform database (the default)"),
    json: bool = typer.Option(False, "--json", help="print the manifest as JSON"),
) -> None:
    """Back up the platform database (or one tenant's rows) to the second region.

    pg_dump runs in one snapshot with the row counts, is encrypted while it streams, and is
    uploaded under a temporary name; the manifest is written last. Retries with backoff when
    the region cannot be reached (backup.retries), then exits 3. The data key comes from the
    region's escrow (made and escrowed first on the very first backup). A tenant's backup holds
    the tenant's lock (exit 5 while it is held, e.g. by a GDPR deletion) and is refused for a
    deleted tenant or one whose keys were shredded.
    """
    from dn import audit
    from dn.backup import keys, run
    from dn.errors import InvalidInput

    if tenant and platform:
        raise InvalidInput("--tenant/--platform", "give one of them, not both")
    c = ctx.obj
    if tenant is not None:
        keys.check_tenant(tenant)
    # a tenant's backup holds the tenant's lock: it cannot run while the tenant is being deleted
    held = [f"tenant:{tenant}", f"db:backup-tenant-{tenant}"] if tenant else [f"db:backup-{keys.PLATFORM}"]
    with audit.privileged(c, "backup run", {"tenant": tenant}, tenant=tenant, lock=held) as op:
        m = run.run_backup(c.settings, c.environ, tenant=tenant, progress=lambda s: c.err.print(s, soft_wrap=True, markup=False))
        op.args.update({"backup": m.id, "size": m.size, "rows": sum(m.tables.values())})
    if json:
        c.out_json(m.model_dump(mode="json"))
    else:
        c.out(m.id)


@app.command("list")
def list_(
    ctx: typer.Context,
    json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """List the backups in the second region: age, size, tier, verified by a drill or not.

    Uploads that never finished are not backups and are not listed (`dn backup prune` removes them).
    """
    from datetime import datetime, timezone

    from dn.backup import run

    c = ctx.obj
    now = datetime.now(timezone.utc)
    with run.open_store(c.settings) as store:
        rows = [r for r in run.plan(c.settings, c.environ, store, now) if r.listing.complete]
    data = [r.to_dict(now) for r in rows]
    if json:
        c.out_json(data)
        return
    c.out(f"{'ID':24} {'SERIES':24} {'AGE':>6} {'SIZE':>10} {'TIER':9} VERIFIED")
    for d in data:
        verified = "yes" if d["verified"] else ("FAILED" if d["last_drill"] else "no")
        c.out(f"{d['id']:24} {d['series']:24} {_human_age(d['age_seconds']):>6} {_human_size(d['size']):>10} "
              f"{d['tier']:9} {verified}")


@app.command("prune")
def prune(
    ctx: typer.Context,
    dry_run: bool = typer.Option(False, "--dry-run", help="print what would be removed, remove nothing"),
    json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Remove backups outside retention: keeps 30 daily + the monthly copies
    (retention.backup_daily_days / backup_monthly_months) and always the newest of each series;
    removes unfinished uploads and backups whose key was destroyed."""
    from datetime import datetime, timezone

    from dn import audit
    from dn.backup import run

    c = ctx.obj
    now = datetime.now(timezone.utc)

    def work(store) -> list:
        rows = run.plan(c.settings, c.environ, store, now)
        return run.prune(store, rows, dry_run=dry_run,
                         progress=lambda s: c.err.print(s, soft_wrap=True, markup=False))

    with run.open_store(c.settings) as store:
        if dry_run:
            doomed = work(store)
        else:
            with audit.privileged(c, "backup prune", {}, lock=["db:backup-prune"]) as op:
                doomed = work(store)
                op.args["removed"] = [r.listing.id for r in doomed]
    data = [{"id": r.listing.id, "series": r.decision.series, "tier": r.decision.tier, "reason": r.decision.reason}
            for r in doomed]
    if json:
        c.out_json({"dry_run": dry_run, "remove": data})
        return
    verb = "would remove" if dry_run else "removed"
    for d in data:
        c.out(f"{verb} {d['id']} {d['series']}: {d['reason']}")
    if not data:
        c.out("nothing to remove")


@app.command("offline")
def offline(
    ctx: typer.Context,
    to: Path = typer.Option(..., "--to", help="the mounted offline disk (a directory) to copy into"),
    backup: Optional[str] = typer.Option(None, "--backup", metavar="ID",
                                         help="copy this backup (default: the newest month's monthly copies)"),
    json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Make the monthly offline copy: copy the newest month's monthly copies (platform and every
    tenant) from the second region into --to, as stored (encrypted, each artifact checked against
    its manifest, the wrapped data keys beside them), and record it in the region for `dn verify`.
    Unmount the disk and store it away afterwards."""
    from dn import audit
    from dn.backup import offline as off

    c = ctx.obj
    off.check_args(to, backup)  # bad input: exit 2, nothing audited, read or written
    with audit.privileged(c, "backup offline", {"to": str(to), "backup": backup}, lock=["db:backup-offline"]) as op:
        done = off.copy_offline(c.settings, c.environ, to, backup_id=backup,
                                progress=lambda s: c.err.print(s, soft_wrap=True, markup=False))
        op.args["copied"] = [d["backup"] for d in done if d["result"] == "copied"]
    if json:
        c.out_json(done)
        return
    for d in done:
        c.out(f"{d['backup']} {d['series']} ({d['month']}): {d['result']} -> {d['path']}")


@app.command("shred")
def shred(
    ctx: typer.Context,
    tenant: str = typer.Argument(..., help="the tenant whose backup keys are destroyed"),
    yes: bool = typer.Option(False, "--yes", help="do not ask for confirmation"),
    json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Destroy a tenant's backup keys (crypto-shredding) here, in every configured host's keystore
    (over SSH) and in the region's escrow, leaving tombstones, then check each place: every backup
    of the tenant becomes unreadable, wherever a copy lives, and no new one is made. Irreversible.
    Platform backups are not affected."""
    from dn import audit
    from dn.backup import keys, run
    from dn.errors import InvalidInput, OperationFailed

    c = ctx.obj
    keys.check_tenant(tenant)
    if not yes:
        import sys

        if not sys.stdin.isatty():
            raise InvalidInput("--yes", "no terminal to confirm on: pass --yes to destroy the keys")
        if not typer.confirm(f"Destroy every backup key of tenant {tenant}? This cannot be undone", err=True):
            raise OperationFailed("cancelled; nothing was destroyed")
    with audit.privileged(c, "backup shred", {"tenant": tenant}, tenant=tenant) as op:
        row = run.tenant_row(c.settings, tenant)  # None: the slug's tenant is gone; its old keys still go
        done = run.shred(c.settings, c.environ, tenant, row.owner if row else None)
        op.args["key_ids"] = done["key_ids"]
    if json:
        c.out_json(done)
    else:
        c.out(f"destroyed {len(done['key_ids'])} key(s) of {done['owner']}")
