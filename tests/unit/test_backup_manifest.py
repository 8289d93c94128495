"""Backup manifests: validation of untrusted JSON, the MAC, backup ids."""
import json
from datetime import datetime, timezone

import pytest

from dn.backup import manifest as mf
from dn.backup.manifest import Manifest
from dn.errors import InvalidInput, OperationFailed

UTC = timezone.utc
KEY = b"\x01" * 32
SHA = "ab" * 32


def make(**over):
    doc = dict(
        id="20250101T023000Z-abc123",
        kind="platform",
        tenant=None,
        snapshot_at=datetime(2025, 1, 1, 2, 30, tzinfo=UTC),
        finished_at=datetime(2025, 1, 1, 2, 31, tzinfo=UTC),
        snapshot_id="00000003-00000002-1",
        source=dict(database="dn", server="dn_owner@127.0.0.1:54329/dn", server_version="15.8", schema_version=3),
        tables={"public.tenants": 3, "public.events": 1000},
        artifacts=[dict(name="platform.dump.enc", kind="pg_dump-custom", size=10, sha256=SHA, plain_size=5,
                        plain_sha256=SHA)],
        key=dict(owner="platform", id="cd" * 16),
    )
    doc.update(over)
    return Manifest.model_validate(doc)


def test_round_trip_and_mac():
    m = make().signed(KEY)
    back = Manifest.from_json(m.to_json(), "test")
    assert back == m
    back.verify(KEY)
    with pytest.raises(OperationFailed, match="fails authentication"):
        back.verify(b"\x02" * 32)


def test_any_edit_breaks_the_mac():
    m = make().signed(KEY)
    doc = json.loads(m.to_json())
    doc["tables"]["public.events"] = 999
    edited = Manifest.from_json(json.dumps(doc).encode(), "test")
    with pytest.raises(OperationFailed, match="changed after the backup was made"):
        edited.verify(KEY)
    unsigned = make()
    with pytest.raises(OperationFailed):
        unsigned.verify(KEY)


@pytest.mark.parametrize("over, where", [
    (dict(id="2025-01-01"), "id"),
    (dict(kind="tenant"), "tenant is set exactly when"),
    (dict(kind="tenant", tenant="acme"), "key owner must be tenant-acme"),
    (dict(artifacts=[]), "artifacts"),
    (dict(artifacts=[dict(name="../etc/passwd.enc", kind="pg_dump-custom", size=1, sha256=SHA, plain_size=1,
                          plain_sha256=SHA)]), "artifacts.0.name"),
    (dict(artifacts=[dict(name="t.copy.enc", kind="copy-binary", table="public.nope", size=1, sha256=SHA,
                          plain_size=1, plain_sha256=SHA)]), "not in tables"),
    (dict(snapshot_at="2025-01-01T02:30:00"), "time zone"),
])
def test_invalid_manifests_are_refused_naming_the_field(over, where):
    doc = json.loads(make().to_json())
    doc.update(over)
    with pytest.raises(OperationFailed, match="not a valid dn-backup/1 manifest") as ei:
        Manifest.from_json(json.dumps(doc, default=str).encode(), "eu2:/backups/x/manifest.json")
    assert where in str(ei.value)


def test_backup_ids():
    at = datetime(2025, 1, 1, 2, 30, 5, tzinfo=UTC)
    i = mf.new_backup_id(at)
    assert mf.ID_RE.fullmatch(i) and i.startswith("20250101T023005Z-")
    assert mf.id_time(i) == at
    assert mf.check_backup_id(i) == i
    with pytest.raises(InvalidInput, match="backup: 'latest' is not a backup id"):
        mf.check_backup_id("latest")


def test_context_binds_id_and_artifact():
    m = make()
    assert m.context("platform.dump.enc") == b"20250101T023000Z-abc123/platform.dump.enc"
    assert m.series == "platform" and m.size == 10
