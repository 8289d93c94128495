"""Backup and disaster-recovery claims: a fresh, checksum-verified daily backup in the second
region, 30 days of dailies without gaps, monthly copies, and a recent, passed restore drill
within the RTO.

Everything is read from the second region itself (dn.backup.store: manifests, artifacts, the
drill verdicts recorded next to each backup) and from this machine's drill history; the retention
decisions are dn.backup.retention's, the same ones `dn backup prune` applies.
"""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING

from dn.errors import OperationFailed, Unreachable
from dn.verify.core import Status, Unknown, plural

if TYPE_CHECKING:
    from dn.verify.probe import Probe

MAX_AGE = timedelta(hours=24)  # RPO 24 h
DAILY_DAYS = 30  # "30-day retention (daily)"
DRILL_MAX_AGE = timedelta(days=31)  # "restore tested monthly"
MAX_RTO_SECONDS = 4 * 3600  # "RTO 4h for a full restore"


def _platform(listings) -> list:
    return sorted((lst for lst in listings if lst.manifest is not None and lst.manifest.kind == "platform"),
                  key=lambda lst: (lst.created, lst.id))


def _hours(td: timedelta) -> str:
    return f"{td.total_seconds() / 3600:.1f} h"


# --------------------------------------------------------------------------------------------
# backup.fresh
# --------------------------------------------------------------------------------------------
def check_fresh(probe: "Probe") -> tuple[Status, list[str]]:
    """The newest platform backup is at most 24 h old, its artifacts match the manifest, and the
    manifest authenticates with its data key (as a drill requires). A backup directory newer than
    it whose manifest cannot be read fails the check: it may well be the newest platform backup
    (its kind is in that manifest), and a drill of it would fail. A data key this machine cannot
    have leaves the authenticity unknown, never passed."""
    listings = probe.backups()
    platform = _platform(listings)
    damaged = [lst for lst in listings if lst.manifest is None and lst.error]
    incomplete = [lst for lst in listings if lst.manifest is None and not lst.error]
    region = f"{probe.settings.backup.region} ({probe.settings.backup.address})" if probe.settings.backup else "?"
    ev = [f"second region {region}: {plural(len(platform), 'platform backup')}, "
          f"{plural(len(incomplete), 'incomplete upload')}, {plural(len(damaged), 'unreadable manifest')}"]
    newest = platform[-1] if platform else None
    fails = []
    for lst in damaged:
        if newest is None or lst.id > newest.id:
            fails.append(f"the newest backup {lst.id} is damaged (newer than every readable platform backup): "
                         f"its manifest cannot be read ({lst.error})")
        else:
            ev.append(f"backup {lst.id}: its manifest cannot be read ({lst.error})")
    for lst in incomplete:
        if newest is None or lst.id > newest.id:
            ev.append(f"backup {lst.id}: no manifest (an upload in progress or one that never finished)")
    if newest is None:
        return Status.FAIL, fails + ["no platform backup in the second region"] + ev
    m = newest.manifest
    age = probe.now - newest.created
    line = f"newest platform backup {newest.id}: snapshot {newest.created:%Y-%m-%d %H:%M} UTC, {_hours(age)} old"
    if age > MAX_AGE:
        fails.append(f"{line} (more than {_hours(MAX_AGE)}: RPO breached)")
    else:
        ev.append(line)
    for a in m.artifacts:
        try:
            size, digest = probe.artifact_sha256(newest.id, a.name)
        except Unreachable:
            raise
        except OperationFailed as e:  # missing or unreadable in a region that answers
            fails.append(f"{newest.id}/{a.name}: cannot be read: {e.message}")
            continue
        if size != a.size:
            fails.append(f"{newest.id}/{a.name}: {size} bytes stored, the manifest says {a.size}")
        elif digest != a.sha256:
            fails.append(f"{newest.id}/{a.name}: SHA-256 {digest[:16]}… differs from the manifest's {a.sha256[:16]}…")
        else:
            ev.append(f"{newest.id}/{a.name}: {size} bytes, SHA-256 matches the manifest ({digest[:16]}…)")
    unverified = None
    try:
        key = probe.backup_key(m)
    except Unknown as e:
        unverified = f"manifest MAC of {newest.id} not checked, its data key cannot be had here: {e}"
    else:
        try:
            m.verify(key)
            ev.append(f"manifest MAC verifies with key {m.key.id[:8]}…")
        except OperationFailed:
            fails.append(f"{newest.id}: the manifest does not authenticate with its data key {m.key.id[:8]}… "
                         "(changed after the backup was made, or not made with this key): a drill refuses it")
    if newest.drill:
        ev.append(f"last drill on this backup: {newest.drill.get('result', 'ok' if newest.drill.get('ok') else 'failed')}"
                  f" at {newest.drill.get('at', '?')}")
    if fails:
        return Status.FAIL, fails + ev
    if unverified:
        raise Unknown(unverified, ev)
    return Status.PASS, ev


# --------------------------------------------------------------------------------------------
# backup.retention / backup.monthly: the retention plan dn applies when it prunes
# --------------------------------------------------------------------------------------------
def _plan(probe: "Probe"):
    def build():
        from dn.backup import run

        return run.plan(probe.settings, probe.environ, probe.backup_store(), probe.now, probe.backups())
    return probe.cached("backup plan", build)


def daily_gaps(days_with_backup: set[date], first: date, last: date) -> list[date]:
    d, out = first, []
    while d <= last:
        if d not in days_with_backup:
            out.append(d)
        d += timedelta(days=1)
    return out


def _spans(days: list[date]) -> str:
    if not days:
        return ""
    out, start, prev = [], days[0], days[0]
    for d in days[1:] + [None]:
        if d is not None and d == prev + timedelta(days=1):
            prev = d
            continue
        out.append(f"{start}" if start == prev else f"{start}..{prev}")
        if d is not None:
            start = prev = d
    return ", ".join(out)


def check_retention(probe: "Probe") -> tuple[Status, list[str]]:
    r = probe.settings.retention
    fails, ev = [], []
    if r.backup_daily_days < DAILY_DAYS:
        fails.append(f"retention.backup_daily_days = {r.backup_daily_days}: prune keeps dailies for less than "
                     f"{DAILY_DAYS} days")
    rows = [row for row in _plan(probe) if row.decision.series == "platform"]
    today = probe.now.astimezone(timezone.utc).date()
    window_start = today - timedelta(days=DAILY_DAYS - 1)
    by_day: dict[date, list] = {}
    for row in rows:
        by_day.setdefault(row.listing.created.astimezone(timezone.utc).date(), []).append(row)
    dropped = [d for d, rs in sorted(by_day.items()) if d >= window_start and not any(x.decision.keep for x in rs)]
    if dropped:
        fails.append(f"prune would leave no backup of {_spans(dropped)}, inside the {DAILY_DAYS}-day window")
    in_window = sorted(d for d in by_day if d >= window_start)
    if in_window:
        first = max(min(by_day), window_start)
        gaps = daily_gaps(set(by_day), first, max(in_window))
        if gaps:
            fails.append(f"no platform backup on {len(gaps)} day(s) inside the {DAILY_DAYS}-day window: {_spans(gaps)}")
        ev.append(f"daily platform backups on {len(in_window)} of the days {first}..{max(in_window)} "
                  f"(window from {window_start}; the series starts {min(by_day)})")
    else:
        fails.append(f"no platform backup in the last {DAILY_DAYS} days")
    kept = sum(1 for row in rows if row.decision.keep)
    ev.append(f"retention plan (daily {r.backup_daily_days} d, monthly {r.backup_monthly_months} months): keeps "
              f"{kept} of {len(rows)} platform backups")
    return (Status.FAIL if fails else Status.PASS), fails + ev


def _months_between(first: date, last: date) -> list[tuple[int, int]]:
    out, y, m = [], first.year, first.month
    while (y, m) <= (last.year, last.month):
        out.append((y, m))
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return out


OFFLINE_GRACE = timedelta(days=7)


def offline_due(created: datetime) -> datetime:
    """When the offline copy of the monthly copy made at ``created`` is due: a week into the
    following month."""
    c = created.astimezone(timezone.utc)
    first_next = datetime(c.year + (c.month == 12), c.month % 12 + 1, 1, tzinfo=timezone.utc)
    return first_next + OFFLINE_GRACE


def check_monthly(probe: "Probe") -> tuple[Status, list[str]]:
    r = probe.settings.retention
    fails, ev = [], []
    if r.backup_monthly_months < 1:
        fails.append(f"retention.backup_monthly_months = {r.backup_monthly_months}: prune keeps no monthly copy")
    rows = [row for row in _plan(probe) if row.decision.series == "platform"]
    monthly = sorted((row for row in rows if row.decision.keep and row.decision.tier == "monthly"),
                     key=lambda row: row.listing.created)
    for row in monthly:
        off = row.listing.offline or {}
        where = (f"offline copy made {off.get('at')} to {off.get('to')}" if off.get("at")
                 else "no offline copy yet (dn backup offline)")
        ev.append(f"monthly copy {row.listing.id} ({row.listing.created:%Y-%m}): {row.decision.reason}; {where}")
        # the trust page's "monthly offline copy": due in the first week after the copy's month
        if not off.get("at") and probe.now >= offline_due(row.listing.created):
            fails.append(f"monthly copy {row.listing.id} ({row.listing.created:%Y-%m}) has no offline copy: "
                         "run `dn backup offline --to <disk>`")
    if not rows:
        fails.append("no platform backup at all, so no monthly copy")
        return Status.FAIL, fails + ev
    if not monthly:
        fails.append("no backup is kept as a monthly copy")
    # every complete month since the series began (within the monthly window) has its copy
    today = probe.now.astimezone(timezone.utc).date()
    first = min(row.listing.created for row in rows).date()
    last_complete = today.replace(day=1) - timedelta(days=1)
    horizon = today.replace(day=1)
    for _ in range(max(r.backup_monthly_months, 0)):
        horizon = (horizon - timedelta(days=1)).replace(day=1)
    have = {(row.listing.created.year, row.listing.created.month) for row in monthly}
    missing = [f"{y}-{m:02d}" for y, m in _months_between(max(first, horizon), last_complete) if (y, m) not in have]
    if missing and r.backup_monthly_months >= 1:
        fails.append(f"no monthly copy for {', '.join(missing)}")
    return (Status.FAIL if fails else Status.PASS), fails + ev


# --------------------------------------------------------------------------------------------
# dr.drill
# --------------------------------------------------------------------------------------------
def _parse_time(value) -> datetime | None:
    if not value:
        return None
    try:
        t = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def drills(history: list[dict], listings) -> list[dict]:
    """Every drill known here or in the second region: {id, at, result, rto, backup, where}."""
    out: dict[str, dict] = {}
    for r in history:
        at = _parse_time(r.get("started_at"))
        if at is None:
            continue
        out[r.get("drill_id") or r["started_at"]] = {
            "id": r.get("drill_id"), "at": at, "result": r.get("result"), "rto": r.get("rto_seconds"),
            "backup": (r.get("backup") or {}).get("id"), "where": "drill history"}
    for lst in listings:
        d = lst.drill or {}
        at = _parse_time(d.get("at"))
        if at is None or (d.get("drill_id") and d["drill_id"] in out):
            continue
        out[d.get("drill_id") or f"{lst.id}@{d['at']}"] = {
            "id": d.get("drill_id"), "at": at, "result": d.get("result") or ("passed" if d.get("ok") else "failed"),
            "rto": d.get("rto_seconds"), "backup": lst.id, "where": "second region"}
    return sorted(out.values(), key=lambda d: d["at"])


def check_drill(probe: "Probe") -> tuple[Status, list[str]]:
    try:
        listings = probe.backups()
        region_note = None
    except Exception as e:  # the local history still tells
        listings, region_note = [], f"second region not read: {e}"
    known = drills(probe.drill_history(), listings)
    ev = [f"{plural(len(known), 'restore drill')} recorded"] + ([region_note] if region_note else [])
    if not known:
        if region_note:
            raise Unknown(f"no drill in this machine's history, and the {region_note}", ev)
        return Status.FAIL, ["no restore drill has ever been recorded"] + ev
    last = known[-1]
    fails = []
    age = probe.now - last["at"]
    rto = "?" if last["rto"] is None else f"{float(last['rto']):.0f} s"
    line = (f"last drill {last['id'] or '?'} ({last['where']}) at {last['at']:%Y-%m-%d %H:%M} UTC on backup "
            f"{last['backup'] or '?'}: {last['result']}, RTO {rto}")
    ev.append(line)
    if age > DRILL_MAX_AGE:
        fails.append(f"the last drill is {age.days} days old (more than {DRILL_MAX_AGE.days})")
    if last["result"] != "passed":
        fails.append(f"the last drill did not pass: {last['result']}")
    if last["rto"] is None:
        fails.append("the last drill measured no RTO")
    elif float(last["rto"]) > MAX_RTO_SECONDS:
        fails.append(f"the last drill's RTO {float(last['rto']) / 3600:.2f} h exceeds {MAX_RTO_SECONDS // 3600} h")
    passed = [d for d in known if d["result"] == "passed"]
    if passed and passed[-1] is not last:
        ev.append(f"last passed drill: {passed[-1]['at']:%Y-%m-%d %H:%M} UTC")
    return (Status.FAIL if fails else Status.PASS), fails + ev
