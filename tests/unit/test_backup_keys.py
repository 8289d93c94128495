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
    k = ks.current("tenant-acme")
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
    a, b, p = ks.current("tenant-acme"), ks.current("tenant-beta"), ks.current("platform")
    assert len({a.key, b.key, p.key}) == 3
    assert ks.owners() == ["platform", "tenant-acme", "tenant-beta"]
    assert ks.lookup(b.id) == b.key and ks.lookup(b"\0" * 16) is None


def test_rotation_keeps_old_keys(tmp_path):
    ks = store(tmp_path)
    old = ks.current("platform")
    new = ks.rotate("platform")
    assert new.id != old.id and ks.current("platform").id == new.id
    assert ks.lookup(old.id) == old.key


def test_wrong_passphrase_is_a_clear_error(tmp_path):
    k = store(tmp_path).current("platform")
    with pytest.raises(KeystoreError, match="passphrase does not unlock") as ei:
        store(tmp_path, b"wrong").lookup(k.id)
    assert "wrong" not in str(ei.value)


def test_destroy_shreds_and_leaves_a_tombstone(tmp_path):
    ks = store(tmp_path)
    k1 = ks.current("tenant-acme")
    k2 = ks.rotate("tenant-acme")
    ids = ks.destroy("tenant-acme")
    assert sorted(ids) == sorted([k1.id.hex(), k2.id.hex()])
    assert ks.lookup(k1.id) is None and ks.lookup(k2.id) is None
    assert not (tmp_path / "backup-keys" / "tenant-acme.json").exists()
    assert ks.destroyed_key_ids() == {k1.id.hex(): "tenant-acme", k2.id.hex(): "tenant-acme"}
    tomb = (tmp_path / "backup-keys" / "destroyed" / "tenant-acme.json").read_text()
    assert k1.key.hex() not in tomb
    with pytest.raises(KeystoreError, match="crypto-shredded"):
        ks.current("tenant-acme")
    assert ks.destroy("tenant-acme") == sorted(ids)  # idempotent
    with pytest.raises(InvalidInput, match="platform key is never destroyed"):
        ks.destroy("platform")


def test_escrow_copy_round_trips_and_foreign_copies_are_refused(tmp_path):
    a = store(tmp_path / "a")
    k = a.current("platform")
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


@pytest.mark.parametrize("bad", ["tenant-", "tenant-ACME", "../platform", "platform2", "tenant-a_b"])
def test_owner_names_are_validated(tmp_path, bad):
    with pytest.raises(InvalidInput, match="key owner"):
        store(tmp_path).current(bad)


def test_owner_for_tenant():
    assert keys.owner_for(None) == "platform" and keys.owner_for("acme") == "tenant-acme"
    with pytest.raises(InvalidInput, match="tenant"):
        keys.owner_for("Acme!")


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
    ks.current("platform")
    assert asked


def test_tampered_keystore_file_is_refused(tmp_path):
    ks = store(tmp_path)
    k = ks.current("platform")
    p = tmp_path / "backup-keys" / "platform.json"
    doc = json.loads(p.read_text())
    doc["keys"][0]["id"] = "00" * 16  # the id is bound to the wrapped key
    p.write_text(json.dumps(doc))
    with pytest.raises(KeystoreError, match="does not unlock"):
        store(tmp_path).lookup(bytes(16))
    assert store(tmp_path).lookup(k.id) is None
