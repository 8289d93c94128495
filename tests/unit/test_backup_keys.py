"""Backup keystore: wrapped per-owner keys, passphrase handling, crypto-shredding."""
import json
import os
import stat
from types import SimpleNamespace

import pytest

from dn.backup import keys
from dn.backup.keys import KeyStore, KeystoreError
from dn.errors import ConfigError, InvalidInput

PASS = b"correct horse battery staple"


@pytest.fixture(autouse=True)
def cheap_scrypt(monkeypatch):
    # the production cost (2^15) is kept for real keystores; tests use a cheaper one for speed
    monkeypatch.setattr(keys, "SCRYPT_N", 1 << 10)


def store(tmp_path, pw=PASS):
    return KeyStore(tmp_path / "backup-keys", lambda: pw)


def test_keys_persist_wrapped_with_private_modes(tmp_path):
    ks = store(tmp_path)
    k = ks.create("tenant-acme")
    assert len(k.key) == 32 and len(k.id) == 16
    again = store(tmp_path).current("tenant-acme")
    assert again.key == k.key and again.id == k.id
    path = tmp_path / "backup-keys" / "tenant-acme.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    raw = path.read_bytes()
    assert k.key not in raw and k.key.hex().encode() not in raw
    assert k.key.hex() not in repr(k)


def test_owners_are_separate_and_lookup_finds_any(tmp_path):
    ks = store(tmp_path)
    a, b, p = ks.create("tenant-acme"), ks.create("tenant-beta"), ks.create("platform")
    assert len({a.key, b.key, p.key}) == 3
    assert ks.owners() == ["platform", "tenant-acme", "tenant-beta"]
    assert ks.lookup(b.id) == b.key and ks.lookup(b"\0" * 16) is None


def test_current_never_makes_a_key(tmp_path):
    ks = store(tmp_path)
    with pytest.raises(KeystoreError, match="no backup key for platform"):
        ks.current("platform")
    assert ks.owners() == []


def test_an_escrowed_file_is_merged_in_and_names_the_current_key(tmp_path):
    a, b = store(tmp_path / "a"), store(tmp_path / "b")
    old = a.create("platform")  # made here by an older dn, never escrowed
    escrow = b.fresh("platform")
    assert b.owners() == []  # fresh() writes nothing
    assert [kid for kid, _ in a.unescrowed("platform", escrow)] == [old.id.hex()]
    a.import_wrapped("platform", escrow)
    new = a.current("platform")
    assert new.id.hex() == keys.key_ids_of(escrow)[0] != old.id.hex()
    assert a.lookup(old.id) == old.key  # the older key still opens its backups
    assert a.unescrowed("platform", escrow) == [(old.id.hex(), a.unescrowed("platform", escrow)[0][1])]
    # a single-key file of the old key (as escrowed beside) unwraps on its own, on another machine
    c = store(tmp_path / "c")
    c.import_wrapped("platform", keys.merged("platform", [escrow, a.unescrowed("platform", escrow)[0][1]]))
    assert c.lookup(old.id) == old.key and c.current("platform").id == new.id
    a.import_wrapped("platform", escrow)  # again: nothing changes
    assert a.current("platform").id == new.id and a.lookup(old.id) == old.key


def test_wrong_passphrase_is_a_clear_error(tmp_path):
    k = store(tmp_path).create("platform")
    with pytest.raises(KeystoreError, match="passphrase does not unlock") as ei:
        store(tmp_path, b"wrong").lookup(k.id)
    assert "wrong" not in str(ei.value)


def test_destroy_shreds_and_leaves_a_tombstone(tmp_path):
    ks = store(tmp_path)
    k1 = ks.create("tenant-acme")
    ks.import_wrapped("tenant-acme", store(tmp_path / "other").fresh("tenant-acme"))
    k2 = ks.current("tenant-acme")
    (tmp_path / "backup-keys" / ".tenant-acme.json.77.tmp").write_bytes(ks.exported("tenant-acme"))  # cut short
    assert len(ks.key_files("tenant-acme")) == 2
    ids = ks.destroy("tenant-acme")
    assert sorted(ids) == sorted([k1.id.hex(), k2.id.hex()])
    assert ks.lookup(k1.id) is None and ks.lookup(k2.id) is None
    assert not (tmp_path / "backup-keys" / "tenant-acme.json").exists() and ks.key_files("tenant-acme") == []
    assert ks.destroyed_key_ids() == {k1.id.hex(): "tenant-acme", k2.id.hex(): "tenant-acme"}
    tomb = (tmp_path / "backup-keys" / "destroyed" / "tenant-acme.json").read_text()
    assert k1.key.hex() not in tomb
    with pytest.raises(KeystoreError, match="crypto-shredded"):
        ks.current("tenant-acme")
    with pytest.raises(KeystoreError, match="crypto-shredded"):
        ks.fresh("tenant-acme")
    with pytest.raises(KeystoreError, match="crypto-shredded"):
        ks.import_wrapped("tenant-acme", store(tmp_path / "third").fresh("tenant-acme"))
    assert ks.destroy("tenant-acme") == sorted(ids)  # idempotent
    with pytest.raises(InvalidInput, match="platform key is never destroyed"):
        ks.destroy("platform")


def test_escrow_copy_round_trips_and_foreign_copies_are_refused(tmp_path):
    a = store(tmp_path / "a")
    k = a.create("platform")
    raw = a.exported("platform")
    b = store(tmp_path / "b")
    b.import_wrapped("platform", raw)
    assert b.lookup(k.id) == k.key
    c = store(tmp_path / "c", b"other passphrase")
    with pytest.raises(KeystoreError, match="does not unlock"):
        c.import_wrapped("platform", raw)
    assert c.owners() == []
    with pytest.raises(KeystoreError, match="not a dn-keystore/1 file"):
        b.import_wrapped("tenant-acme", raw)  # a file for another owner


@pytest.mark.parametrize("bad", ["tenant-", "tenant-ACME", "../platform", "platform2", "tenant-a_b", "tenant-a.1",
                                 "tenant-a.0-0123abcd", "tenant-a.1-0123ABCD", "tenant-a.1-0123abc", "tenant-a.x"])
def test_owner_names_are_validated(tmp_path, bad):
    with pytest.raises(InvalidInput, match="key owner"):
        store(tmp_path).current(bad)


def test_owner_for_tenant():
    # a tenant's key belongs to its identity (registry id and creation time), not its slug
    from datetime import datetime, timedelta, timezone

    t = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
    owner = keys.owner_for("acme", 7, t)
    assert keys.owner_for(None) == "platform" and owner.startswith("tenant-acme.7-") and keys.check_owner(owner)
    assert keys.owner_for("acme", 7, t.astimezone(timezone(timedelta(hours=2)))) == owner  # the instant counts
    assert keys.owner_for("acme", 8, t) != owner  # a later tenant under the slug
    assert keys.owner_for("acme", 7, t + timedelta(microseconds=1)) != owner  # the id handed out again
    assert keys.legacy_owner("acme") == "tenant-acme" and keys.check_owner("tenant-acme")
    with pytest.raises(InvalidInput, match="tenant"):
        keys.owner_for("Acme!", 1, t)
    for bad in (None, 0, -1, True, "7"):
        with pytest.raises(InvalidInput, match="tenant id"):
            keys.owner_for("acme", bad, t)
    with pytest.raises(InvalidInput, match="created_at"):
        keys.owner_for("acme", 7, t.replace(tzinfo=None))


def test_passphrase_sources(tmp_path):
    f = tmp_path / "pp"
    f.write_text("from-file\n")
    os.chmod(f, 0o600)
    cfg = SimpleNamespace(passphrase_env="DN_PASSPHRASE", passphrase_file=f)
    assert keys.passphrase_from(cfg, {"DN_PASSPHRASE": "from-env"}) == b"from-env"
    assert keys.passphrase_from(cfg, {}) == b"from-file"
    os.chmod(f, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        keys.passphrase_from(cfg, {})
    with pytest.raises(ConfigError, match="set \\$DN_PASSPHRASE"):
        keys.passphrase_from(SimpleNamespace(passphrase_env="DN_PASSPHRASE", passphrase_file=None), {})
    with pytest.raises(ConfigError, match="file not found"):
        keys.passphrase_from(SimpleNamespace(passphrase_env="X", passphrase_file=tmp_path / "none"), {})


def test_passphrase_is_asked_only_when_unwrapping(tmp_path):
    asked = []
    ks = KeyStore(tmp_path / "k", lambda: asked.append(1) or PASS)
    assert ks.owners() == [] and ks.lookup(b"\1" * 16) is None
    assert asked == []
    ks.create("platform")
    assert asked


def test_tampered_keystore_file_is_refused(tmp_path):
    ks = store(tmp_path)
    k = ks.create("platform")
    p = tmp_path / "backup-keys" / "platform.json"
    doc = json.loads(p.read_text())
    doc["keys"][0]["id"] = "00" * 16  # the id is bound to the wrapped key
    p.write_text(json.dumps(doc))
    with pytest.raises(KeystoreError, match="does not unlock"):
        store(tmp_path).lookup(bytes(16))
    assert store(tmp_path).lookup(k.id) is None
