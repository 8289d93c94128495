"""`dn keys rotate` / `dn keys status` against the real platform database: every Fernet-encrypted
value moves to the new key and still decrypts to the same secret; an interrupted rotation
continues; retiring is refused while a value is under an old key; nothing is left under a
retired key; keys never appear in an error, the audit log or argv."""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
from pathlib import Path

import pytest

from dn.errors import OperationFailed, PolicyViolation
from dn.gdpr import keys
from tests.integration.test_gdpr_setup import add_tenant, fernet_key, wipe_gdpr

pytestmark = [pytest.mark.postgres]

COLUMNS = (("api_keys", "key_ciphertext", "fernet_key_id"), ("tenant_containers", "container_config_ciphertext", "fernet_key_id"),
           ("users", "totp_secret_ciphertext", "totp_fernet_key_id"))


def _ctx(settings, *ks: str):
    from dn.context import Context

    env = {k: v for k, v in os.environ.items() if k not in ("CI", "GITHUB_ACTIONS") and not k.startswith("DN_")}
    env["DN_FERNET_KEYS"] = ",".join(ks)
    return Context(environ=env, _settings=settings)


def _secrets(conn, *ks: str) -> dict[tuple[str, str], list[bytes]]:
    """Every encrypted value, decrypted with exactly ``ks`` (fails if one is under another key)."""
    from cryptography.fernet import Fernet, MultiFernet

    multi = MultiFernet([Fernet(k) for k in ks])
    out = {}
    for table, col, _ in COLUMNS:
        rows = conn.execute(f"SELECT {col} FROM {table} WHERE {col} IS NOT NULL ORDER BY ctid").fetchall()
        out[(table, col)] = sorted(multi.decrypt(r[0].encode()) for r in rows)
    return out


def _key_ids(conn) -> set:
    found = set()
    for table, col, kcol in COLUMNS:
        found |= {r[0] for r in conn.execute(f"SELECT DISTINCT {kcol} FROM {table} WHERE {col} IS NOT NULL").fetchall()}
    return found


@pytest.fixture
def data(dn_settings, pg_super):
    from dn import db

    wipe_gdpr(pg_super)  # the key ids other tests recorded
    k1 = fernet_key()
    with db.connect(dn_settings.database) as conn:
        for s in ("key-one", "key-two", "key-three"):
            add_tenant(conn, s, {"DN_FERNET_KEYS": k1}, events=5, hours=1, invoices=1, host="test-eu1")
        # a value sealed before key ids were recorded
        conn.execute("UPDATE users SET totp_fernet_key_id = NULL WHERE id = (SELECT min(id) FROM users "
                     "WHERE totp_secret_ciphertext IS NOT NULL)")
        # a tenant being deleted: rotation still reaches its rows (dn's maintenance passes the guard)
        conn.execute("UPDATE tenants SET status = 'deleting' WHERE slug = 'key-three'")
        before = _secrets(conn, k1)
    yield k1, before
    wipe_gdpr(pg_super)


def test_rotation_moves_every_value_to_the_new_key(dn_settings, data):
    from dn import audit, db

    k1, before = data
    total = sum(len(v) for v in before.values())
    st = keys.key_status(_ctx(dn_settings, k1))
    assert [(k.key_id, k.role) for k in st.keys] == [(keys.key_id(k1.encode()), "primary")]
    assert st.unsealed == 1 and st.keys[0].values == total - 1 and st.problems

    k2 = fernet_key()
    ctx = _ctx(dn_settings, k2, k1)
    res = keys.rotate(ctx, batch_size=4)
    assert sum(res.reencrypted.values()) == total and res.batches >= total // 4
    with db.connect(dn_settings.database) as conn:
        assert _secrets(conn, k2) == before  # the new key alone opens every value, unchanged
        assert _key_ids(conn) == {keys.key_id(k2.encode())}
    st = keys.key_status(ctx)
    roles = {k.key_id: (k.role, k.values) for k in st.keys}
    assert roles == {keys.key_id(k2.encode()): ("primary", total), keys.key_id(k1.encode()): ("active", 0)}
    assert st.problems == []
    # running it again finds nothing to do
    assert sum(keys.rotate(ctx).reencrypted.values()) == 0

    res = keys.rotate(ctx, retire_old=True)
    assert res.retired == [keys.key_id(k1.encode())]
    st = keys.key_status(ctx)
    assert any("retired key" in p and "still in $DN_FERNET_KEYS" in p for p in st.problems)
    assert keys.key_status(_ctx(dn_settings, k2)).problems == []

    entries = [e for e in audit.show(ctx) if e.command == "keys rotate"]
    assert [e.outcome for e in entries] == ["ok", "ok", "ok"]
    assert {"table": "api_keys", "column": "key_ciphertext", "values": 6} in entries[0].args["reencrypted"]
    assert entries[-1].args["retired_key_ids"] == [keys.key_id(k1.encode())]
    logged = json.dumps([e.to_dict() for e in audit.show(ctx)])
    assert k1 not in logged and k2 not in logged


def _crash_after_batches(ctx, n: int) -> None:
    seen = []

    def progress(msg):
        seen.append(msg)
        if len(seen) == n:
            os._exit(77)

    try:
        keys.rotate(ctx, batch_size=3, progress=progress)
    finally:
        os._exit(3)


def test_an_interrupted_rotation_continues_where_it_stopped(dn_settings, data):
    from dn import db

    k1, before = data
    k2 = fernet_key()
    ctx = _ctx(dn_settings, k2, k1)
    proc = multiprocessing.get_context("fork").Process(target=_crash_after_batches, args=(ctx, 2))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 77
    with db.connect(dn_settings.database) as conn:
        assert _key_ids(conn) == {keys.key_id(k1.encode()), keys.key_id(k2.encode()), None}
        done = sum(1 for table, col, kcol in COLUMNS for _ in conn.execute(
            f"SELECT 1 FROM {table} WHERE {kcol} = %s", (keys.key_id(k2.encode()),)).fetchall())
        assert done == 6  # two committed batches of three
        assert _secrets(conn, k2, k1) == before
        conn.execute("DELETE FROM op_locks WHERE resource = 'db:fernet-keys'")  # the dead run's lock row
    res = keys.rotate(ctx, batch_size=3)
    total = sum(len(v) for v in before.values())
    assert sum(res.reencrypted.values()) == total - 6
    with db.connect(dn_settings.database) as conn:
        assert _secrets(conn, k2) == before and _key_ids(conn) == {keys.key_id(k2.encode())}


def test_retiring_is_refused_while_a_value_is_under_an_old_key(dn_settings, data):
    from dn import db

    k1, _ = data
    k2 = fernet_key()
    with db.connect(dn_settings.database) as conn, pytest.raises(PolicyViolation, match="values remain under"):
        keys.retire(conn, keys.dmap.load(), keys.parse_keys(f"{k2},{k1}"))
    keys.rotate(_ctx(dn_settings, k2, k1), retire_old=True)
    # the application, misconfigured, writes a value under the retired key: status shows it
    with db.connect(dn_settings.database) as conn:
        from cryptography.fernet import Fernet

        tid = conn.execute("SELECT id FROM tenants WHERE slug = 'key-one'").fetchone()[0]
        conn.execute("INSERT INTO api_keys (tenant_id, key_id, key_ciphertext, fernet_key_id) VALUES (%s, %s, %s, %s)",
                     (tid, "k_stale_retired", Fernet(k1.encode()).encrypt(b"x").decode(), keys.key_id(k1.encode())))
    st = keys.key_status(_ctx(dn_settings, k2))
    assert st.under_retired == 1 and any("remain under retired key" in p for p in st.problems)
    # and rotating again moves it, even though that key is retired (it is still in the environment here)
    keys.rotate(_ctx(dn_settings, k2, k1))
    assert keys.key_status(_ctx(dn_settings, k2)).under_retired == 0


def test_a_value_no_key_opens_stops_the_batch_and_names_the_column_not_the_value(dn_settings, data):
    from cryptography.fernet import Fernet

    from dn import db

    k1, _ = data
    stray = Fernet.generate_key()
    token = Fernet(stray).encrypt(b"lost").decode()
    with db.connect(dn_settings.database) as conn:
        tid = conn.execute("SELECT id FROM tenants WHERE slug = 'key-one'").fetchone()[0]
        conn.execute("INSERT INTO api_keys (tenant_id, key_id, key_ciphertext, fernet_key_id) VALUES (%s, 'k_stray_0001', %s, 'fk-unknown')",
                     (tid, token))
    k2 = fernet_key()
    with pytest.raises(OperationFailed) as e:
        keys.rotate(_ctx(dn_settings, k2, k1), batch_size=100)
    assert "api_keys.key_ciphertext: a value cannot be decrypted" in str(e.value)
    assert token not in str(e.value) and k1 not in str(e.value) and k2 not in str(e.value)
    with db.connect(dn_settings.database) as conn:  # the failing batch changed nothing
        assert conn.execute("SELECT count(*) FROM api_keys WHERE fernet_key_id = %s",
                            (keys.key_id(k2.encode()),)).fetchone()[0] == 0
    st = keys.key_status(_ctx(dn_settings, k2, k1))
    assert any("fk-unknown, which is not in $DN_FERNET_KEYS" in p for p in st.problems)


def test_cli_status_and_rotate_take_keys_from_the_environment_only(dn_settings, dn_cli_env, data):
    k1, _ = data
    k2 = fernet_key()
    dn = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "dn")
    env = {**dn_cli_env, "DN_FERNET_KEYS": f"{k2},{k1}"}
    r = subprocess.run([dn, "keys", "status", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 4  # a value without a key id is a problem until rotated
    st = json.loads(r.stdout)
    assert st["unsealed"] == 1 and k1 not in r.stdout + r.stderr
    r = subprocess.run([dn, "keys", "rotate", "--retire-old"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert keys.key_id(k2.encode()) in r.stdout and "retired: " + keys.key_id(k1.encode()) in r.stdout
    r = subprocess.run([dn, "keys", "status"], env={**env, "DN_FERNET_KEYS": k2}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "retired" in r.stdout and "primary" in r.stdout
    r = subprocess.run([dn, "keys", "rotate"], env={**env, "DN_FERNET_KEYS": "not-a-key"}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "key 1 is not a Fernet key" in r.stderr and "not-a-key" not in r.stderr
