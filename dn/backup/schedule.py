"""systemd OnCalendar expressions (settings.schedules): when the next and previous runs are.

The stacks render these expressions into systemd timers on the host; `dn dr status` needs to
know when the next drill is due and whether the last scheduled one was missed, on any machine,
so the common subset is evaluated here, in UTC (dn's hosts run in UTC):

    [Mon..Fri|Sat,Sun] [YYYY|*]-[MM|*]-[DD|*] HH:MM[:SS] [UTC]

Each field takes ``*``, numbers, lists ``a,b``, ranges ``a..b`` and steps ``a/n`` or ``a..b/n``;
the shorthands ``minutely hourly daily weekly monthly quarterly semiannually yearly annually``
work too. Anything else (``~`` last-day syntax, other time zones) is refused with a clear error.

Pure: standard library only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone

from dn.errors import InvalidInput

_SHORTHANDS = {
    "minutely": "*-*-* *:*:00",
    "hourly": "*-*-* *:00:00",
    "daily": "*-*-* 00:00:00",
    "weekly": "Mon *-*-* 00:00:00",
    "monthly": "*-*-01 00:00:00",
    "quarterly": "*-01,04,07,10-01 00:00:00",
    "semiannually": "*-01,07-01 00:00:00",
    "yearly": "*-01-01 00:00:00",
    "annually": "*-01-01 00:00:00",
}
_DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_HORIZON_DAYS = 366 * 8


@dataclass(frozen=True)
class Calendar:
    expression: str
    weekdays: frozenset[int]
    years: frozenset[int] | None  # None: every year
    months: frozenset[int]
    days: frozenset[int]
    hours: tuple[int, ...]
    minutes: tuple[int, ...]
    seconds: tuple[int, ...]

    def _day_ok(self, d: date) -> bool:
        return (d.weekday() in self.weekdays and d.month in self.months and d.day in self.days
                and (self.years is None or d.year in self.years))

    def _times(self):
        return ((h, m, s) for h in self.hours for m in self.minutes for s in self.seconds)

    def next_after(self, t: datetime) -> datetime | None:
        """The first scheduled time strictly after ``t`` (aware), or None within 8 years."""
        t = t.astimezone(timezone.utc)
        d = t.date()
        for _ in range(_HORIZON_DAYS):
            if self._day_ok(d):
                for h, m, s in self._times():
                    c = datetime.combine(d, time(h, m, s), timezone.utc)
                    if c > t:
                        return c
            d += timedelta(days=1)
        return None

    def previous_before(self, t: datetime) -> datetime | None:
        """The last scheduled time at or before ``t`` (aware), or None within 8 years."""
        t = t.astimezone(timezone.utc)
        d = t.date()
        for _ in range(_HORIZON_DAYS):
            if self._day_ok(d):
                for h, m, s in sorted(self._times(), reverse=True):
                    c = datetime.combine(d, time(h, m, s), timezone.utc)
                    if c <= t:
                        return c
            d -= timedelta(days=1)
        return None


def _bad(expr: str, why: str) -> InvalidInput:
    return InvalidInput("schedule", f"{expr!r}: {why}")


def _field(expr: str, text: str, lo: int, hi: int, what: str) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"(\*|\d+)(?:\.\.(\d+))?(?:/(\d+))?", part)
        if not m:
            raise _bad(expr, f"cannot read {what} {part!r}")
        start_s, end_s, step_s = m.groups()
        if start_s == "*":
            if end_s:
                raise _bad(expr, f"{what}: '*..' is not a range")
            start, end = lo, hi
        else:
            start = int(start_s)
            end = int(end_s) if end_s else (hi if step_s else start)
        step = int(step_s) if step_s else 1
        if step < 1 or not (lo <= start <= hi) or not (lo <= end <= hi) or end < start:
            raise _bad(expr, f"{what} {part!r} is outside {lo}..{hi}")
        out.update(range(start, end + 1, step))
    return frozenset(out)


def _weekdays(expr: str, text: str) -> frozenset[int]:
    out: set[int] = set()
    for part in text.lower().split(","):
        ends = part.split("..")
        try:
            idx = [_DAYS.index(p[:3]) for p in ends if p]
        except ValueError:
            raise _bad(expr, f"unknown weekday in {part!r}") from None
        if len(idx) == 1 and len(ends) == 1:
            out.add(idx[0])
        elif len(idx) == 2:
            a, b = idx
            if a > b:
                raise _bad(expr, f"weekday range {part!r} runs backwards (systemd refuses it too)")
            out.update(range(a, b + 1))
        else:
            raise _bad(expr, f"cannot read weekdays {part!r}")
    return frozenset(out)


def parse(expr: str) -> Calendar:
    """Parse an OnCalendar expression of the supported subset."""
    text = " ".join(expr.split())
    text = _SHORTHANDS.get(text.lower(), text)
    if "~" in text:
        raise _bad(expr, "the '~' (days from the end of the month) syntax is not supported by dn")
    words = text.split(" ")
    if words and words[-1].upper() == "UTC":
        words = words[:-1]
    weekdays = frozenset(range(7))
    if words and re.match(r"^[A-Za-z]", words[0]):
        weekdays = _weekdays(expr, words.pop(0))
    date_s, time_s = "*-*-*", None
    for w in words:
        if "-" in w and ":" not in w:
            date_s = w
        elif ":" in w and time_s is None:
            time_s = w
        else:
            raise _bad(expr, f"cannot read {w!r} (only UTC is supported as a time zone)")
    if time_s is None:
        time_s = "00:00:00"
    d = date_s.split("-")
    if len(d) == 2:
        d = ["*", *d]
    if len(d) != 3:
        raise _bad(expr, f"date {date_s!r} must be YEAR-MONTH-DAY")
    t = time_s.split(":")
    if len(t) == 2:
        t.append("00")
    if len(t) != 3:
        raise _bad(expr, f"time {time_s!r} must be HH:MM[:SS]")
    years = None if d[0] == "*" else _field(expr, d[0], 1970, 2199, "year")
    return Calendar(
        expression=expr,
        weekdays=weekdays,
        years=years,
        months=_field(expr, d[1], 1, 12, "month"),
        days=_field(expr, d[2], 1, 31, "day"),
        hours=tuple(sorted(_field(expr, t[0], 0, 23, "hour"))),
        minutes=tuple(sorted(_field(expr, t[1], 0, 59, "minute"))),
        seconds=tuple(sorted(_field(expr, t[2], 0, 59, "second"))),
    )
