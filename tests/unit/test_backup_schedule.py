"""OnCalendar evaluation, checked against systemd's own implementation where it is installed."""
import shutil
import subprocess
from datetime import datetime, timezone

import pytest

from dn.backup import schedule
from dn.errors import InvalidInput

UTC = timezone.utc

CASES = [
    "*-*-01 04:00:00",
    "*-*-* 02:30:00",
    "*-*-* 03:30",
    "Mon *-*-* 05:00:00",
    "Mon..Fri *-*-* 08,12,18:00",
    "Sat,Sun *-*-1..7 04:00:00",
    "*-01,07-01 00:00:00",
    "*-*-* *:0/15:00",
    "*-02-29 12:00:00",
    "2027-*-* 00:00:00",
    "monthly",
    "weekly",
    "daily",
    "hourly",
    "*-*-01 04:00:00 UTC",
    "Fri..Sun *-*-* 23:59:59",
]
BASES = [datetime(2025, 3, 15, 12, 0, tzinfo=UTC), datetime(2024, 12, 31, 23, 59, 59, tzinfo=UTC),
         datetime(2026, 2, 28, 4, 0, tzinfo=UTC)]


@pytest.mark.parametrize("expr", CASES)
def test_next_matches_systemd(expr):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    cal = schedule.parse(expr)
    for base in BASES:
        r = subprocess.run(
            ["systemd-analyze", "calendar", "--iterations=1", f"--base-time={base:%Y-%m-%d %H:%M:%S} UTC",
             expr if expr.endswith("UTC") else expr + " UTC"],
            capture_output=True, text=True, env={"TZ": "UTC", "PATH": "/usr/bin:/bin", "SYSTEMD_COLORS": "0"},
        )
        assert r.returncode == 0, r.stderr
        line = next(ln for ln in r.stdout.splitlines() if "Next elapse:" in ln)
        want = datetime.strptime(line.split("Next elapse:")[1].strip()[4:], "%Y-%m-%d %H:%M:%S UTC").replace(tzinfo=UTC)
        assert cal.next_after(base) == want, (expr, base)


def test_previous_and_next_bracket_now():
    cal = schedule.parse("*-*-01 04:00:00")
    now = datetime(2025, 3, 15, 12, 0, tzinfo=UTC)
    assert cal.previous_before(now) == datetime(2025, 3, 1, 4, 0, tzinfo=UTC)
    assert cal.next_after(now) == datetime(2025, 4, 1, 4, 0, tzinfo=UTC)
    exact = datetime(2025, 3, 1, 4, 0, tzinfo=UTC)
    assert cal.previous_before(exact) == exact and cal.next_after(exact) == datetime(2025, 4, 1, 4, 0, tzinfo=UTC)


def test_never_matching_expression_returns_none():
    cal = schedule.parse("*-02-30 00:00:00")
    assert cal.next_after(datetime(2025, 1, 1, tzinfo=UTC)) is None


@pytest.mark.parametrize("bad, why", [
    ("*-*~01 04:00", "not supported"),
    ("*-13-01 04:00", "month '13' is outside 1..12"),
    ("Funday *-*-* 00:00", "unknown weekday"),
    ("*-*-* 25:00", "hour '25' is outside"),
    ("*-*-* 04:00 Europe/Prague", "only UTC"),
    ("*-*-*-* 04:00", "YEAR-MONTH-DAY"),
    ("Fri..Mon *-*-* 04:00", "runs backwards"),
])
def test_unsupported_or_invalid_expressions_are_named(bad, why):
    with pytest.raises(InvalidInput, match="schedule") as ei:
        schedule.parse(bad)
    assert why in str(ei.value)
