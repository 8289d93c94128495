"""Which backups to keep: pure selection, the plan that `dn backup prune` prints and applies.

Per series (the platform, and each tenant separately), with D = retention.backup_daily_days and
M = retention.backup_monthly_months:

- daily:    the newest backup of each UTC day of the last D days;
- monthly:  the first backup of each calendar month (UTC), kept M months after it was made —
            the trust page's "monthly offline copy" (copy these to offline media);
- newest:   the newest complete backup of a series is always kept, even when it is older than
            every window (backups that stopped must not be pruned to nothing);
- shredded: backups whose data key was destroyed are unreadable by design and are removed;
- incomplete: an upload that never got its manifest is not a backup; it is removed once it is
            older than a grace period (so a run still uploading is left alone).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Iterable

INCOMPLETE_GRACE = timedelta(hours=24)


@dataclass(frozen=True)
class Entry:
    id: str
    series: str
    created: datetime  # aware, UTC
    complete: bool = True
    key_destroyed: bool = False


@dataclass(frozen=True)
class Decision:
    id: str
    series: str
    created: datetime
    keep: bool
    tier: str  # daily | monthly | newest | expired | shredded | incomplete
    reason: str


def add_months(t: datetime, months: int) -> datetime:
    """``t`` moved by whole calendar months, the day clamped to the month's length."""
    idx = t.year * 12 + (t.month - 1) + months
    year, month = divmod(idx, 12)
    month += 1
    days = [31, 29 if (year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)) else 28, 31, 30, 31, 30,
            31, 31, 30, 31, 30, 31][month - 1]
    return t.replace(year=year, month=month, day=min(t.day, days))


def plan(
    entries: Iterable[Entry],
    now: datetime,
    *,
    daily_days: int,
    monthly_months: int,
    incomplete_grace: timedelta = INCOMPLETE_GRACE,
) -> list[Decision]:
    """A decision for every entry, newest first within each series."""
    out: list[Decision] = []
    by_series: dict[str, list[Entry]] = {}
    for e in entries:
        by_series.setdefault(e.series, []).append(e)
    daily_from = now - timedelta(days=daily_days)
    for series in sorted(by_series):
        items = sorted(by_series[series], key=lambda e: (e.created, e.id), reverse=True)
        complete = [e for e in items if e.complete and not e.key_destroyed]
        newest = complete[0].id if complete else None
        day_pick: dict[object, str] = {}
        month_pick: dict[tuple[int, int], str] = {}
        for e in complete:  # newest first: the first seen per day is the day's newest
            day_pick.setdefault(e.created.date(), e.id)
        for e in reversed(complete):  # oldest first: the first seen per month is the month's first
            month_pick.setdefault((e.created.year, e.created.month), e.id)
        for e in items:
            if e.key_destroyed:
                d = Decision(e.id, series, e.created, False, "shredded",
                             "its data key was destroyed (crypto-shredded): unreadable by design")
            elif not e.complete:
                if now - e.created > incomplete_grace:
                    d = Decision(e.id, series, e.created, False, "incomplete",
                                 "upload never finished (no manifest)")
                else:
                    d = Decision(e.id, series, e.created, True, "incomplete",
                                 "upload without manifest, younger than the grace period: may still be running")
            elif monthly_months > 0 and month_pick.get((e.created.year, e.created.month)) == e.id \
                    and add_months(e.created, monthly_months) > now:
                d = Decision(e.id, series, e.created, True, "monthly",
                             f"first backup of {e.created:%Y-%m}, kept {monthly_months} months")
            elif e.created >= daily_from and day_pick.get(e.created.date()) == e.id:
                d = Decision(e.id, series, e.created, True, "daily",
                             f"newest backup of {e.created:%Y-%m-%d}, kept {daily_days} days")
            elif e.id == newest:
                d = Decision(e.id, series, e.created, True, "newest",
                             "the newest backup of its series is always kept")
            elif e.created >= daily_from:
                d = Decision(e.id, series, e.created, False, "expired",
                             f"a newer backup of {e.created:%Y-%m-%d} is kept")
            else:
                d = Decision(e.id, series, e.created, False, "expired",
                             f"older than {daily_days} days and not a monthly copy")
            out.append(d)
    return out
