"""Retention: 30 daily + monthly copies, newest always kept, shredded and incomplete removed."""
from datetime import datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from dn.backup.retention import Entry, add_months, plan

UTC = timezone.utc
NOW = datetime(2025, 6, 15, 12, 0, tzinfo=UTC)


def daily_series(days, series="platform", hour=2):
    start = NOW.replace(hour=hour, minute=30) - timedelta(days=days - 1)
    return [Entry(f"{series}-{i:04d}", series, start + timedelta(days=i)) for i in range(days)]


def by_id(decisions):
    return {d.id: d for d in decisions}


def test_a_year_of_dailies_keeps_30_days_and_12_monthlies():
    entries = daily_series(400)
    d = plan(entries, NOW, daily_days=30, monthly_months=12)
    kept = [x for x in d if x.keep]
    daily = [x for x in kept if x.tier == "daily"]
    monthly = [x for x in kept if x.tier == "monthly"]
    assert len(daily) + len([m for m in monthly if m.created >= NOW - timedelta(days=30)]) == 30
    # one monthly per calendar month made in the last 12 months; the first of each month
    assert all(m.created.day == 1 for m in monthly)
    assert len(monthly) == 12
    assert min(m.created for m in monthly) > add_months(NOW, -12)
    assert len(kept) == len(daily) + len(monthly)
    assert all(x.tier == "expired" for x in d if not x.keep)


def test_the_newest_backup_survives_when_backups_stopped():
    old = [Entry(f"b{i}", "platform", NOW - timedelta(days=60 + i)) for i in range(5)]
    d = by_id(plan(old, NOW, daily_days=30, monthly_months=0))
    assert d["b0"].keep and d["b0"].tier == "newest"
    assert not any(d[f"b{i}"].keep for i in range(1, 5))


def test_same_day_extra_backups_keep_only_the_days_newest():
    e = [Entry("morning", "platform", NOW.replace(hour=2)), Entry("noon", "platform", NOW.replace(hour=11)),
         Entry("yesterday", "platform", NOW - timedelta(days=1))]
    d = by_id(plan(e, NOW, daily_days=30, monthly_months=0))
    assert d["noon"].keep and not d["morning"].keep and d["yesterday"].keep
    assert "a newer backup of 2025-06-15 is kept" in d["morning"].reason


def test_series_are_retained_independently():
    e = daily_series(3, "platform") + daily_series(3, "tenant-acme")
    d = plan(e, NOW, daily_days=1, monthly_months=0)
    for series in ("platform", "tenant-acme"):
        assert sum(x.keep for x in d if x.series == series) == 1


def test_shredded_and_incomplete():
    e = [
        Entry("gone", "tenant-old", NOW - timedelta(days=1), key_destroyed=True),
        Entry("half-old", "platform", NOW - timedelta(days=2), complete=False),
        Entry("half-new", "platform", NOW - timedelta(hours=1), complete=False),
        Entry("good", "platform", NOW - timedelta(days=1)),
    ]
    d = by_id(plan(e, NOW, daily_days=30, monthly_months=12))
    assert not d["gone"].keep and d["gone"].tier == "shredded"
    assert not d["half-old"].keep and d["half-old"].tier == "incomplete"
    assert d["half-new"].keep and "may still be running" in d["half-new"].reason
    assert d["good"].keep


def test_add_months_clamps_the_day():
    assert add_months(datetime(2025, 1, 31, tzinfo=UTC), 1) == datetime(2025, 2, 28, tzinfo=UTC)
    assert add_months(datetime(2024, 3, 31, tzinfo=UTC), -1) == datetime(2024, 2, 29, tzinfo=UTC)
    assert add_months(datetime(2025, 11, 15, tzinfo=UTC), 3) == datetime(2026, 2, 15, tzinfo=UTC)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 900 * 24), min_size=1, max_size=60, unique=True),
    st.integers(1, 60),
    st.integers(0, 24),
)
def test_invariants(hours_ago, daily_days, monthly_months):
    e = [Entry(f"b{h}", "platform", NOW - timedelta(hours=h)) for h in hours_ago]
    d = plan(e, NOW, daily_days=daily_days, monthly_months=monthly_months)
    assert {x.id for x in d} == {x.id for x in e}
    kept = [x for x in d if x.keep]
    newest = min(hours_ago)
    assert any(x.id == f"b{newest}" for x in kept)  # never prune to nothing
    assert len(kept) <= daily_days + 1 + monthly_months + 1
    days = [x.created.date() for x in kept if x.tier == "daily"]
    assert len(days) == len(set(days))
    for x in kept:
        if x.tier == "daily":
            assert x.created >= NOW - timedelta(days=daily_days)
        if x.tier == "monthly":
            assert add_months(x.created, monthly_months) > NOW
    # every backup inside the daily window that is its day's newest is kept
    for x in d:
        if x.created >= NOW - timedelta(days=daily_days):
            same_day = [y for y in d if y.created.date() == x.created.date()]
            if x.created == max(y.created for y in same_day):
                assert x.keep
