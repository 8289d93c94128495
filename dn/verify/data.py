"""Data claims: event capture 15 days, aggregates 24 months, GDPR deletion within 30 days,
platform API keys only under current Fernet keys.

Read from the platform database as dn's day-to-day role. Evidence holds counts, dates and
request ids, never a row's personal content.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from dn.verify.core import Status, plural

if TYPE_CHECKING:
    from dn.verify.probe import Probe

EVENTS_DAYS = 15  # "Event capture for debugging: 15 days"
AGGREGATES_MONTHS = 24  # "Aggregated statistics (request log per hour): 24 months"
DELETION_DAYS = 30  # "Deletion happens within 30 days"
GRACE_DAYS = 1  # retention enforcement runs daily


def check_events(probe: "Probe") -> tuple[Status, list[str]]:
    cfg = probe.settings.retention.events_days
    fails = []
    if cfg > EVENTS_DAYS:
        fails.append(f"retention.events_days = {cfg}: events are kept longer than {EVENTS_DAYS} days")
    row = probe.query(
        "SELECT count(*) AS n, min(occurred_at) AS oldest,"
        " count(*) FILTER (WHERE occurred_at < now() - make_interval(days => %s)) AS old"
        " FROM events", (EVENTS_DAYS + GRACE_DAYS,), what="reading events")[0]
    ev = [f"{plural(row['n'], 'captured event')}" + (f", oldest {row['oldest']:%Y-%m-%d %H:%M} UTC" if row["oldest"] else "")]
    if row["old"]:
        fails.append(f"{plural(row['old'], 'event')} older than {EVENTS_DAYS} days (+{GRACE_DAYS} day for the daily "
                     f"enforcement); oldest {row['oldest']:%Y-%m-%d}")
    return (Status.FAIL if fails else Status.PASS), fails + ev


def check_aggregates(probe: "Probe") -> tuple[Status, list[str]]:
    cfg = probe.settings.retention.aggregates_months
    fails = []
    if cfg > AGGREGATES_MONTHS:
        fails.append(f"retention.aggregates_months = {cfg}: aggregates are kept longer than {AGGREGATES_MONTHS} months")
    row = probe.query(
        "SELECT count(*) AS n, min(hour) AS oldest,"
        " count(*) FILTER (WHERE hour < now() - make_interval(months => %s, days => %s)) AS old"
        " FROM hourly_stats", (AGGREGATES_MONTHS, GRACE_DAYS), what="reading hourly_stats")[0]
    ev = [f"{plural(row['n'], 'hourly aggregate')}" + (f", oldest hour {row['oldest']:%Y-%m-%d %H:00} UTC" if row["oldest"] else "")]
    if row["old"]:
        fails.append(f"{plural(row['old'], 'hourly aggregate')} older than {AGGREGATES_MONTHS} months; oldest "
                     f"{row['oldest']:%Y-%m-%d}")
    return (Status.FAIL if fails else Status.PASS), fails + ev


def check_deadlines(probe: "Probe") -> tuple[Status, list[str]]:
    fails, ev = [], []
    reqs = probe.query(
        "SELECT d.id, t.slug, d.received_at, d.due_at, d.status,"
        " d.due_at < now() AS overdue, extract(epoch FROM now() - d.due_at) / 86400 AS days_over,"
        " d.due_at > d.received_at + make_interval(days => %s) AS late_deadline"
        " FROM deletion_requests d JOIN tenants t ON t.id = d.tenant_id"
        " WHERE d.completed_at IS NULL AND d.status <> 'done' ORDER BY d.due_at",
        (DELETION_DAYS,), what="reading deletion requests")
    for r in reqs:
        line = (f"deletion request #{r['id']} (tenant {r['slug']}), received {r['received_at']:%Y-%m-%d}, "
                f"due {r['due_at']:%Y-%m-%d}, {r['status']}")
        if r["overdue"]:
            fails.append(f"{line}: {float(r['days_over']):.1f} days OVERDUE")
        elif r["late_deadline"]:
            fails.append(f"{line}: deadline more than {DELETION_DAYS} days after receipt")
        else:
            ev.append(f"{line}: {-float(r['days_over']):.1f} days left")
    done = probe.query("SELECT count(*) AS n, count(*) FILTER (WHERE completed_at > due_at) AS late"
                       " FROM deletion_requests WHERE completed_at IS NOT NULL", what="reading deletion requests")[0]
    ev.insert(0, f"{plural(len(reqs), 'open deletion request')}; {done['n']} completed"
                 + (f" ({done['late']} of them after their deadline)" if done["late"] else ""))
    cancelled = probe.query(
        "SELECT slug, cancelled_at, extract(epoch FROM now() - cancelled_at) / 86400 AS days"
        " FROM tenants WHERE status = 'cancelled' AND cancelled_at < now() - make_interval(days => %s)",
        (DELETION_DAYS,), what="reading tenants")
    for t in cancelled:
        fails.append(f"tenant {t['slug']} cancelled on {t['cancelled_at']:%Y-%m-%d} ({float(t['days']):.0f} days ago) "
                     "and still not deleted")
    return (Status.FAIL if fails else Status.PASS), fails + ev


def check_no_retired(probe: "Probe") -> tuple[Status, list[str]]:
    st = probe.fernet_status()
    ring_known = any(k.in_environment for k in st.keys)
    fails, ev = [], []
    for k in st.keys:
        cols = ", ".join(f"{c} {n}" for c, n in sorted(k.per_column.items())) or "no values"
        line = f"key {k.key_id} ({k.role}{', retired ' + k.retired_at[:10] if k.retired_at else ''}): {cols}"
        if k.role == "retired" and k.values:
            fails.append(f"{k.values} value(s) still encrypted under RETIRED key {k.key_id}: {cols}")
        elif k.role == "unknown" and k.values and ring_known:
            fails.append(f"{k.values} value(s) under key {k.key_id}, which is neither in the environment nor "
                         f"recorded: they cannot be decrypted ({cols})")
        else:
            ev.append(line)
        if k.role == "retired" and k.in_environment:
            ev.append(f"retired key {k.key_id} is still in the environment (remove it)")
    if st.unsealed:
        ev.append(f"{st.unsealed} encrypted value(s) record no key id")
    if not ring_known:
        ev.append("DN_FERNET_KEYS is not set here: which ids are current is unknown; retired ids come from the database")
    if not st.keys:
        ev.append("no Fernet key and no encrypted value recorded")
    return (Status.FAIL if fails else Status.PASS), fails + ev
