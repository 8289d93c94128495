"""dn dr: restore drills that measure RPO and RTO, their status, and real restores."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Disaster recovery: restore drills (RPO/RTO), status, real restores.", no_args_is_help=True)

MAX_RPO = typer.Option(None, "--max-rpo-hours", min=0.0,
                       help="RPO threshold: the newest backup may be at most this old (default: dr.max_rpo_hours, 24)")
MAX_RTO = typer.Option(None, "--max-rto-hours", min=0.0,
                       help="RTO threshold: download to verified database in at most this long (default: dr.max_rto_hours, 4)")


def _progress(c):
    return lambda s: c.err.print(s, soft_wrap=True, markup=False)


@app.command("drill")
def drill_(
    ctx: typer.Context,
    backup: Optional[str] = typer.Option(None, "--backup", "-b", help="backup id (default: the newest platform backup)"),
    json: bool = typer.Option(False, "--json", help="print the JSON report instead of the summary"),
    max_rpo_hours: Optional[float] = MAX_RPO,
    max_rto_hours: Optional[float] = MAX_RTO,
    checks: Optional[Path] = typer.Option(None, "--checks",
                                          help='TOML file of extra sanity checks: [[check]] name = "..." sql = "..." (default: dr.checks_file)'),
    jobs: int = typer.Option(2, "--jobs", "-j", min=1, max=32, help="pg_restore parallel jobs"),
) -> None:
    """Restore a backup into a scratch database, verify it, measure RPO/RTO, drop it.

    Exit 0: passed. Exit 1: the drill failed (damaged backup, missing key, restore or check
    failure). Exit 4: it worked but RPO or RTO exceeds its threshold. The report is kept in the
    drill history (`dn dr status`); failures and breaches trigger the alert hook.
    """
    from datetime import timedelta

    from dn import audit
    from dn.backup import drill
    from dn.errors import OperationFailed, PolicyViolation

    c = ctx.obj
    cfg = c.settings.dr
    max_rpo_hours = cfg.max_rpo_hours if max_rpo_hours is None else max_rpo_hours
    max_rto_hours = cfg.max_rto_hours if max_rto_hours is None else max_rto_hours
    loaded = drill.load_checks(checks or cfg.checks_file)
    with audit.privileged(c, "dr drill", {"backup": backup}, lock=["db:dr-drill"]) as op:
        report = drill.run_drill(c.settings, c.environ, backup_id=backup, max_rpo=timedelta(hours=max_rpo_hours),
                                 max_rto=timedelta(hours=max_rto_hours), checks=loaded, jobs=jobs,
                                 progress=_progress(c))
        op.args.update({k: report.get(k) for k in ("drill_id", "result", "rpo_seconds", "rto_seconds")})
        op.args["backup"] = (report.get("backup") or {}).get("id")
        if json:
            c.out_json(report)
        else:
            c.out(drill.summary(report))
        for line in report.get("alerts", []):
            c.err.print(line, soft_wrap=True, markup=False)
        if report["result"] == "failed":
            raise OperationFailed(f"DR drill failed: {report['failures'][0]}", runbook="disaster-recovery#a-drill-failed")
        if report["result"] == "breach":
            raise PolicyViolation(f"DR drill: {report['breaches'][0]}", runbook="disaster-recovery#a-drill-failed")


@app.command("status")
def status(
    ctx: typer.Context,
    json: bool = typer.Option(False, "--json", help="print JSON"),
    max_rpo_hours: Optional[float] = MAX_RPO,
) -> None:
    """Last backup age, last drill (time, result, RTO, RPO), next scheduled drill.

    Exit 4 when something is wrong (RPO breached, the monthly drill overdue, the last drill
    failed), 3 when the backup region cannot be reached.
    """
    from datetime import timedelta

    from dn.backup import drill
    from dn.errors import PolicyViolation, Unreachable

    c = ctx.obj
    if max_rpo_hours is None:
        max_rpo_hours = c.settings.dr.max_rpo_hours
    st = drill.status(c.settings, c.environ, max_rpo=timedelta(hours=max_rpo_hours))
    if json:
        c.out_json(st)
    else:
        lb, ld = st.get("last_backup"), st.get("last_drill")
        c.out(f"backup region   {st['backup_region']}")
        if lb:
            c.out(f"last backup     {lb['id']}  {lb['age_seconds'] / 3600:.1f} h old")
        elif "last_backup" in st:
            c.out("last backup     none")
        if ld:
            rto = f"{ld['rto_seconds']:.0f} s" if ld.get("rto_seconds") is not None else "-"
            rpo = f"{ld['rpo_seconds'] / 3600:.1f} h" if ld.get("rpo_seconds") is not None else "-"
            c.out(f"last drill      {ld['started_at']}  {ld['result'].upper()}  RTO {rto}  RPO {rpo}")
        else:
            c.out("last drill      never")
        c.out(f"next drill      {st['next_drill'] or 'never (schedules.drill matches no date)'}  ({st['schedule']})")
        for a in st["alarms"]:
            c.err.print(f"[bold red]{a}[/]", soft_wrap=True)
        if not st["alarms"]:
            c.err.print("[green]all DR promises hold[/]")
    if str(st.get("backup_region", "")).startswith("unreachable"):
        raise Unreachable(st["backup_region"], runbook="disaster-recovery#the-backup-region-is-unreachable")
    if st["alarms"]:
        raise PolicyViolation(st["alarms"][0], runbook="disaster-recovery")


@app.command("restore")
def restore(
    ctx: typer.Context,
    backup: str = typer.Option(..., "--backup", "-b", help="backup id (see `dn backup list`)"),
    target: str = typer.Option(..., "--target", help="DSN of the database to restore into (no password in it)"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty target (it is kept under another name)"),
    yes: bool = typer.Option(False, "--yes", help="do not ask for confirmation"),
    jobs: int = typer.Option(2, "--jobs", "-j", min=1, max=32, help="pg_restore parallel jobs"),
    json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Restore a backup into TARGET: a real restore after a disaster.

    Restores into a staging database on the target server, verifies row counts and checks, then
    renames it to the target's name (the old database, if any, renamed away in the same
    transaction). Refuses a non-empty target unless --force (the old database is then kept as
    <name>_replaced_<time>), and refuses to swap while any client is connected to the target.
    Audited; when the target is the platform database itself (or the platform database is gone),
    the audit entry is written into the database that carries its name afterwards.
    """
    import sys

    from dn import audit
    from dn.backup import drill
    from dn.errors import DnError, InvalidInput, OperationFailed, Unreachable

    c = ctx.obj
    args = {"backup": backup, "target": target, "force": force}

    def confirm(plan: str) -> bool:
        if yes:
            return True
        if not sys.stdin.isatty():
            raise InvalidInput("--yes", "no terminal to confirm on: pass --yes to restore")
        return typer.confirm(plan + "\nProceed?", err=True)

    def do() -> dict:
        return drill.restore(c.settings, c.environ, backup_id=backup, target_dsn=target, force=force,
                             confirm=confirm, jobs=jobs, progress=_progress(c))

    def audit_after(out: dict | None, failure: BaseException | None) -> None:
        outcome, code = audit.outcome_of(failure) if failure is not None else ("ok", 0)
        entry = {**args, "result": out["result"] if out else None, "replaced": (out or {}).get("replaced")}
        try:
            audit.record(c, "dr restore", entry, outcome=outcome, exit_code=code)
        except DnError as err:
            if failure is None:
                raise OperationFailed(f"the restore completed but its audit entry could not be written: {err.message}",
                                      where="audit") from None
            c.err.print(f"[yellow]warning:[/] the restore was not audited: {err.message}", soft_wrap=True)

    if drill.replaces_platform_database(c.settings, target):
        # dn's own session on the platform database would keep it from being renamed (and its
        # locks would stay with the old database): restore holding none (the restore lock is on
        # the server's maintenance database), then audit into what carries the platform
        # database's name: the restored database, or the untouched one if the restore failed.
        try:
            out = do()
        except BaseException as e:
            audit_after(None, e)
            raise
        audit_after(out, None)
    else:
        entered = False
        try:
            # the lock row tells other commands (tenant destroy) that a restore runs; the lock
            # that serializes restores onto one server is drill.restore's own
            with audit.privileged(c, "dr restore", args, lock=["db:dr-restore"]) as op:
                entered = True
                out = do()
                op.args.update({"result": out["result"], "replaced": out.get("replaced")})
        except Unreachable as e:
            if entered or e.where != "database":
                raise
            # The platform database is gone (the disaster this command exists for): restore, then
            # audit into the restored database, whose chain continues from the backup.
            c.err.print(f"platform database unreachable ({e.message}); the restore is audited in the restored database",
                        soft_wrap=True, markup=False)
            out = do()
            from dn import db

            try:
                with db.connect_dsn(target, c.settings.database.passfile, application_name="dn dr restore (audit)") as conn:
                    audit.record(c, "dr restore", {**args, "result": out["result"]}, conn=conn)
            except Exception as err:  # the restore stands; say loudly that it is not audited
                c.err.print(f"[yellow]warning:[/] the restore was not audited: {err}", soft_wrap=True)
    if json:
        c.out_json(out)
    else:
        c.out(f"restored backup {backup} into {out['target']}"
              + (f"; the previous database is kept as {out['replaced']}" if out.get("replaced") else ""))
