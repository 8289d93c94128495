"""Retention enforcement (`dn retention enforce`): delete what has passed its retention period
per the data map, in batches, with counts per table.

Cutoffs come from the database clock and ``settings.retention``:

- a period in days or months: rows whose age column is older than now minus the period;
- a period in years counted from the end of the calendar year (accounting): a record of year Y
  is kept until the end of year Y + N, so rows dated before 1 January of (this year - N) go;
- the audit class is enforced by the audit log's anchored prune (dn.audit.prune), which keeps
  the remaining chain verifiable.

Classes without a period ("until the tenant's deletion") are left to `dn gdpr delete`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Callable

from dn.errors import DnError
from dn.gdpr import datamap as dmap
from dn.gdpr.batches import BATCH_ROWS, delete_in_batches
from dn.gdpr.sqlgen import Condition, column, ident

if TYPE_CHECKING:
    from dn.config import RetentionConfig
    from dn.context import Context
    from dn.db import Connection

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Rule:
    table: str
    data_class: str
    age_column: str
    cutoff: datetime | date
    period: str  # e.g. "15 days", "5 years from the end of the calendar year"
    enforced_by: str | None = None

    def condition(self) -> Condition:
        return Condition(f"{column(self.age_column)} < %s", (self.cutoff,))


def cutoff(period: dmap.Period, retention: "RetentionConfig", now: datetime) -> datetime | date:
    """The oldest moment still inside ``period`` at ``now`` (rows older than it are past it)."""
    from dn.backup.retention import add_months

    n = int(getattr(retention, period.setting))
    if period.unit == "days":
        return now - timedelta(days=n)
    if period.unit == "months":
        return add_months(now, -n)
    if period.start == "end of the calendar year":
        return date(now.astimezone(timezone.utc).year - n, 1, 1)
    return now.replace(year=now.year - n) if not (now.month == 2 and now.day == 29) else now.replace(year=now.year - n, day=28)


def rules(dm: dmap.DataMap, retention: "RetentionConfig", now: datetime) -> list[Rule]:
    """One rule per table whose class has a retention period (pure)."""
    out = []
    for t in sorted(dm.tables.values(), key=lambda t: t.name):
        period = dm.classes[t.data_class].period
        if period.setting is None:
            continue
        if not t.age:
            continue  # a class enforced elsewhere (audit) may map tables without an age column
        out.append(Rule(t.name, t.data_class, t.age, cutoff(period, retention, now),
                        period.describe(retention), period.enforced_by))
    return out


@dataclass
class TableResult:
    table: str
    data_class: str
    period: str
    cutoff: str
    expired: int
    deleted: int = 0
    batches: int = 0
    longest_batch_ms: float = 0.0
    enforced_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Result:
    now: str
    dry_run: bool
    tables: list[TableResult] = field(default_factory=list)
    errors: list[DnError] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"now": self.now, "dry_run": self.dry_run, "tables": [t.to_dict() for t in self.tables],
                "deleted": sum(t.deleted for t in self.tables), "expired": sum(t.expired for t in self.tables),
                "errors": [str(e) for e in self.errors]}


def enforce(ctx: "Context", conn: "Connection", *, dry_run: bool = False, batch_size: int = BATCH_ROWS,
            dm: dmap.DataMap | None = None, progress: Progress = lambda s: None) -> Result:
    """Count (``dry_run``) or delete the expired rows of every table with a retention period.
    Refuses a database the data map does not cover. The audit log goes through dn.audit.prune."""
    from dn import audit, db

    dm = dm or dmap.load()
    with db.translate_errors("enforcing retention"):
        dmap.require_coverage(dm, dmap.read_catalog(conn), "to enforce retention")
        now = conn.execute("SELECT clock_timestamp()").fetchone()[0]
    result = Result(now.isoformat(), dry_run)
    # The audit log goes last: a refused prune (a chain that does not verify is an incident)
    # must not keep expired personal data in the other tables.
    for rule in sorted(rules(dm, ctx.settings.retention, now), key=lambda r: r.enforced_by is not None):
        if rule.enforced_by == "audit prune":
            try:
                pr = audit.prune(ctx, ctx.settings.retention.audit_days, dry_run=dry_run)
            except DnError as e:
                result.errors.append(e)
                progress(f"{rule.table}: not pruned: {e.message}")
                continue
            result.tables.append(TableResult(rule.table, rule.data_class, rule.period, pr.cutoff.isoformat(),
                                             pr.count, 0 if dry_run else pr.count, enforced_by=rule.enforced_by))
            progress(f"{rule.table}: {pr.count} entries older than {rule.period} "
                     + ("would be pruned" if dry_run else "pruned (anchored)"))
            continue
        cond = rule.condition()
        with db.translate_errors(f"enforcing retention on {rule.table}"):
            expired = conn.execute(f"SELECT count(*) FROM {ident(rule.table)} WHERE {cond.sql}", cond.params).fetchone()[0]
            tr = TableResult(rule.table, rule.data_class, rule.period, rule.cutoff.isoformat(), expired)
            if not dry_run and expired:
                stats = delete_in_batches(
                    conn, rule.table, cond, batch_size=batch_size, order=rule.age_column,
                    on_batch=lambda s, n, t=rule.table: progress(f"{t}: {s.deleted} deleted"))
                tr.deleted, tr.batches, tr.longest_batch_ms = stats.deleted, stats.batches, round(stats.longest_ms, 1)
        progress(f"{rule.table}: {expired} rows older than {rule.period} (before {tr.cutoff})"
                 + ("" if dry_run else f", {tr.deleted} deleted"))
        result.tables.append(tr)
    return result


def run(ctx: "Context", *, dry_run: bool = False, batch_size: int = BATCH_ROWS,
        progress: Progress = lambda s: None) -> Result:
    """`dn retention enforce`: audited unless ``dry_run``; one run at a time (lock db:retention)."""
    from dn import audit, db

    if dry_run:
        with db.connect(ctx.settings.database, application_name="dn retention enforce --dry-run") as conn:
            res = enforce(ctx, conn, dry_run=True, batch_size=batch_size, progress=progress)
        if res.errors:
            raise res.errors[0]
        return res
    with audit.privileged(ctx, "retention enforce", {}, lock=["db:retention"]) as op:
        with db.connect(ctx.settings.database, application_name=f"dn retention enforce {ctx.request_id}") as conn:
            res = enforce(ctx, conn, batch_size=batch_size, progress=progress)
        op.args["deleted"] = {t.table: t.deleted for t in res.tables}
        if res.errors:  # the other tables were enforced; the run still fails, audited as such
            raise res.errors[0]
    return res
