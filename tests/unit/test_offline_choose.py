"""Which backups `dn backup offline` copies (pure: the retention decisions decide)."""
from datetime import datetime, timezone

import pytest

from dn.backup.offline import check_args, choose
from dn.backup.retention import Decision
from dn.backup.run import Row
from dn.backup.store import Listing
from dn.errors import InvalidInput, OperationFailed

COMPLETE = object()  # stands for a manifest: choose() only asks whether there is one


def row(backup_id: str, series: str, tier: str, keep: bool = True, complete: bool = True) -> Row:
    created = datetime.strptime(backup_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    return Row(Listing(backup_id, created, COMPLETE if complete else None),
               Decision(backup_id, series, created, keep, tier, "test"))


ROWS = [
    row("20261126T020000Z-aaaaaa", "platform", "newest"),
    row("20261101T020000Z-bbbbbb", "platform", "monthly"),
    row("20261101T030000Z-cccccc", "tenant-acme", "monthly"),
    row("20261102T030000Z-dddddd", "tenant-gone", "shredded", keep=False),
    row("20261001T020000Z-eeeeee", "platform", "monthly"),
    row("20261125T020000Z-ffffff", "platform", "incomplete", keep=False, complete=False),
]


def test_the_newest_months_monthly_copies_of_every_series():
    assert [r.listing.id for r in choose(ROWS)] == ["20261101T020000Z-bbbbbb", "20261101T030000Z-cccccc"]


def test_one_backup_by_id_but_never_a_shredded_or_incomplete_one():
    assert [r.listing.id for r in choose(ROWS, "20261126T020000Z-aaaaaa")] == ["20261126T020000Z-aaaaaa"]
    for bad, rule in (("20261102T030000Z-dddddd", "crypto-shredded"), ("20261125T020000Z-ffffff", "incomplete"),
                      ("20261126T020000Z-000000", "no backup")):
        with pytest.raises(InvalidInput) as e:
            choose(ROWS, bad)
        assert e.value.field == "--backup" and rule in e.value.rule


def test_no_monthly_copy_yet():
    with pytest.raises(OperationFailed, match="no monthly copy"):
        choose([r for r in ROWS if r.decision.tier != "monthly"])


def test_bad_arguments_name_the_option(tmp_path):
    with pytest.raises(InvalidInput) as e:
        check_args(tmp_path / "not-mounted", None)
    assert e.value.field == "--to"
    with pytest.raises(InvalidInput) as e:
        check_args(tmp_path, "../../etc/passwd")
    assert e.value.field == "--backup"
    check_args(tmp_path, "20261126T020000Z-aaaaaa")  # fine
