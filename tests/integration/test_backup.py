"""Backups against the real platform database and the sandbox's second-region SFTP target."""
from __future__ import annotations

import json
import shutil
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from tests.fixtures.sandbox import remove_backup_dir

from dn.backup import crypto, keys, run
from dn.backup.manifest import Manifest
from dn.errors import InvalidInput, Unreachable

pytestmark = [pytest.mark.postgres, pytest.mark.sandbox]

PASSPHRASE = "correct horse battery staple for tests"

# Realistic platform data: tenants with users, API keys, container configs, settings, GTM
# workspaces, tracking events (IPs, user agents, cookie ids, order values), hourly statistics,
# invoices and deletion requests. ``scale`` multiplies the per-tenant row counts.
GENERATE_SQL = """
INSERT INTO tenants (slug, display_name, plan, host, status, created_at)
SELECT 'shop-' || lpad((g + %(after)s)::text, 4, '0'), 'Shop ' || g || ' s.r.o.', CASE WHEN g % 5 = 0 THEN 'pro' ELSE 'standard' END,
       'sandbox-eu1', 'active', now() - (g || ' days')::interval
FROM generate_series(1, %(tenants)s) g;

CREATE TEMP TABLE new_tenants ON COMMIT DROP AS SELECT * FROM tenants WHERE id > %(last_id)s;

INSERT INTO users (tenant_id, email, name, password_hash, role, totp_secret_ciphertext, created_at)
SELECT t.id, 'user' || u || '@shop' || t.id || '.example', 'User ' || u,
       'pbkdf2_sha256$600000$' || md5(t.id || '-' || u) || '$' || encode(sha256((t.id || ':' || u)::bytea), 'base64'),
       (ARRAY['owner', 'admin', 'member', 'viewer'])[1 + u % 4],
       CASE WHEN u % 3 = 0 THEN 'gAAAAA' || md5(u::text) END, now() - (u || ' hours')::interval
FROM new_tenants t, generate_series(1, 4) u;

INSERT INTO api_keys (tenant_id, key_id, key_ciphertext, fernet_key_id, label, created_at)
SELECT t.id, 'k_' || substr(md5(t.id || 'k' || k), 1, 20), 'gAAAAA' || md5(t.id || 'secret' || k), 'fk1',
       'key ' || k, now()
FROM new_tenants t, generate_series(1, 2) k;

INSERT INTO tenant_containers (tenant_id, container_config_ciphertext, fernet_key_id, replicas)
SELECT id, 'gAAAAA' || md5('cfg' || id), 'fk1', 1 + id % 3 FROM new_tenants;

INSERT INTO tenant_settings (tenant_id, key, value)
SELECT id, 'tracking.consent_mode', jsonb_build_object('enabled', id % 2 = 0) FROM new_tenants;

INSERT INTO gtm_workspaces (tenant_id, version, workspace)
SELECT id, 1, jsonb_build_object('containerId', 'GTM-' || upper(substr(md5(id::text), 1, 7)),
       'tags', jsonb_build_array(jsonb_build_object('name', 'GA4', 'type', 'gaawc')))
FROM new_tenants;

INSERT INTO events (tenant_id, occurred_at, event_name, client_ip, user_agent, cookie_id, payload)
SELECT t.id, now() - (e || ' minutes')::interval,
       (ARRAY['page_view', 'add_to_cart', 'begin_checkout', 'purchase'])[1 + e % 4],
       ('10.' || (e % 250) || '.' || (t.id % 250) || '.' || (1 + e % 200))::inet,
       'Mozilla/5.0 (X11; Linux x86_64) Firefox/' || (100 + e % 30),
       md5(t.id || 'cookie' || (e % 97)),
       jsonb_build_object('value', round((e % 500)::numeric * 1.37, 2), 'currency', 'CZK',
                          'items', jsonb_build_array(jsonb_build_object('sku', 'SKU-' || (e % 50), 'qty', 1 + e % 3)))
FROM new_tenants t, generate_series(1, %(events)s) e;

INSERT INTO hourly_stats (tenant_id, hour, requests, errors, rate_limited, bytes_in, bytes_out, p95_ms)
SELECT t.id, date_trunc('hour', now()) - (h || ' hours')::interval, 1000 + h % 77, h % 5, h % 3,
       200000 + h, 900000 + h, 40 + h % 60
FROM new_tenants t, generate_series(1, %(hours)s) h;

INSERT INTO invoices (tenant_id, number, issued_at, due_at, paid_at, amount, vat_amount, currency, billing_name,
                      billing_address, billing_vat_id)
SELECT t.id, 'DN-' || t.id || '-' || i, current_date - i * 30, current_date - i * 30 + 14,
       CASE WHEN i > 1 THEN current_date - i * 30 + 7 END, 990 + i, round((990 + i) * 0.21, 2), 'CZK',
       'Shop ' || t.id || ' s.r.o.', 'Ulice ' || t.id || ', Praha', 'CZ' || (10000000 + t.id)
FROM new_tenants t, generate_series(1, %(invoices)s) i;

INSERT INTO deletion_requests (tenant_id, received_at, due_at, status)
SELECT id, now() - interval '2 days', now() + interval '28 days', 'pending' FROM new_tenants WHERE id % 4 = 0;
"""


def generate(conn, *, tenants: int = 6, events: int = 300, hours: int = 48, invoices: int = 3) -> None:
    """Add ``tenants`` tenants with realistic rows (``conn``: the owner or a superuser, autocommit);
    called again, it adds more tenants after the existing ones."""
    after, last_id = conn.execute("SELECT count(*), coalesce(max(id), 0) FROM tenants").fetchone()
    params = {"tenants": tenants, "events": events, "hours": hours, "invoices": invoices, "after": after,
              "last_id": last_id}
    with conn.transaction():
        for stmt in GENERATE_SQL.split(";\n\n"):
            conn.execute(stmt.replace("%", "%%").replace("%%(", "%("), params)


def table_rows(conn, table: str) -> list[tuple]:
    """Every row of ``table`` in a stable order (all columns), for row-for-row comparison."""
    ncols = conn.execute(
        "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'public' AND table_name = %s",
        (table,)).fetchone()[0]
    order = ", ".join(str(i) for i in range(1, ncols + 1))
    return conn.execute(f'SELECT * FROM "{table}" ORDER BY {order}').fetchall()


@pytest.fixture
def bk(sandbox, dn_settings_data, pg_cluster, pg_database, pg_super):
    """Settings for the test database plus a private directory in the sandbox's backup region."""
    from dn.config import Settings

    # drills and restores create scratch databases: the owner role needs CREATEDB (runbook:
    # disaster-recovery#database-privileges), as on a real server
    pg_super.execute("ALTER ROLE dn_owner CREATEDB")
    path = f"/backups/test-{uuid.uuid4().hex[:10]}"
    backup = {**sandbox.settings.backup.model_dump(mode="json"), "path": path, "retries": 1}
    settings = Settings.model_validate({**dn_settings_data, "backup": backup, "source": "test"})
    env = {"DN_PASSPHRASE": PASSPHRASE}
    yield settings, env
    remove_backup_dir(settings.backup, path)


@pytest.fixture(autouse=True)
def cheap_scrypt(monkeypatch):
    monkeypatch.setattr(keys, "SCRYPT_N", 1 << 12)


def test_platform_backup_streams_encrypted_with_snapshot_counts(bk, pg_super):
    settings, env = bk
    generate(pg_super)
    expected = {t: pg_super.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("tenants", "users", "events", "hourly_stats", "invoices", "api_keys")}
    messages = []
    m = run.run_backup(settings, env, progress=messages.append)
    assert m.kind == "platform" and m.tenant is None
    for t, n in expected.items():
        assert m.tables[f"public.{t}"] == n
    assert "public.audit_log" in m.tables and "public.schema_migrations" in m.tables
    (art,) = m.artifacts
    assert art.name == "platform.dump.enc" and art.kind == "pg_dump-custom"
    assert art.size == art.plain_size + crypto.HEADER.size + (art.plain_size // crypto.DEFAULT_CHUNK + 1) * 16
    with run.open_store(settings) as store:
        listed = store.list()
        assert [lst.id for lst in listed] == [m.id]
        again = store.manifest(m.id)
        assert again == m
        raw = store._get_small(f"{store.root}/{m.id}/platform.dump.enc", 64 << 20)
        # stored bytes are ciphertext: no tenant name or e-mail address in clear
        assert b"shop0001" not in raw and b"@shop1.example" not in raw and raw.startswith(crypto.MAGIC)
        # the wrapped keys are escrowed next to the backups
        assert json.loads(store.get_key("platform"))["owner"] == "platform"
    m.verify(keys.keystore(settings, env).lookup(bytes.fromhex(m.key.id)))
    assert any("committed" in s for s in messages)


def test_tenant_backup_holds_only_that_tenants_rows(bk, pg_super):
    settings, env = bk
    generate(pg_super, tenants=3, events=50)
    tid = pg_super.execute("SELECT id FROM tenants WHERE slug = 'shop-0002'").fetchone()[0]
    m = run.run_backup(settings, env, tenant="shop-0002")
    owner = run.tenant_row(settings, "shop-0002").owner  # the tenant's identity, not its slug
    assert m.kind == "tenant" and m.tenant == "shop-0002" and m.key.owner == owner
    assert owner.startswith(f"tenant-shop-0002.{tid}-")
    assert m.tables["public.tenants"] == 1
    assert m.tables["public.events"] == pg_super.execute("SELECT count(*) FROM events WHERE tenant_id = %s",
                                                         (tid,)).fetchone()[0] == 50
    assert m.tables["public.users"] == 4
    assert "public.audit_log" not in m.tables  # not tenant data
    kinds = {a.kind for a in m.artifacts}
    assert kinds == {"pg_dump-custom", "copy-binary"}
    ks = keys.keystore(settings, env)
    assert ks.current(owner).id.hex() == m.key.id != ks.current("platform").id.hex()


def test_unknown_tenant_is_invalid_input_and_leaves_nothing(bk, pg_super):
    settings, env = bk
    generate(pg_super, tenants=1, events=5)
    with pytest.raises(InvalidInput, match="tenant: no tenant 'nope'"):
        run.run_backup(settings, env, tenant="nope")
    with run.open_store(settings) as store:
        assert store.list() == []


def test_unreachable_region_is_retried_with_backoff_then_fails_clearly(bk, pg_super):
    settings, env = bk
    generate(pg_super, tenants=1, events=5)
    # nothing listens on port 2222 in the second region's namespace: connection refused
    dead = settings.model_copy(update={"backup": settings.backup.model_copy(update={"port": 2222, "retries": 3})})
    waits, said = [], []
    with pytest.raises(Unreachable) as ei:
        run.run_backup(dead, env, sleep=waits.append, backoff=0.5, progress=said.append)
    assert waits == [0.5, 1.0, 2.0]
    assert "gave up after 4 attempts" in str(ei.value) and "connection refused" in str(ei.value)
    assert len([s for s in said if "retry" in s]) == 3
    with run.open_store(settings) as store:
        assert store.list() == []


def test_interrupted_upload_is_never_listed_and_prune_removes_it(bk, pg_super, sandbox):
    settings, env = bk
    generate(pg_super, tenants=4, events=3000)
    no_retry = settings.model_copy(update={"backup": settings.backup.model_copy(update={"retries": 0})})
    killed = []

    def cut_connection(n):
        # once bytes flow, kill the server side of our SFTP connection (a dropped link)
        if killed:
            return
        for pid in _eu2_sftp_sessions(sandbox):
            # a session may end between listing and killing: only a kill that hit counts
            if sandbox.ns_exec(["kill", "-9", str(pid)], netns="dn-eu2", check=False).returncode == 0:
                killed.append(pid)

    with pytest.raises(Unreachable):
        run.run_backup(no_retry, env, on_bytes=cut_connection)
    assert killed
    with run.open_store(settings) as store:
        listings = store.list()
        assert all(not lst.complete for lst in listings)
        rows = run.plan(settings, env, store)
        # a real run may still be uploading: not removed before the grace period
        assert all(r.decision.tier == "incomplete" and r.decision.keep for r in rows)
        later = datetime.now(timezone.utc) + timedelta(days=2)
        rows = run.plan(settings, env, store, now=later)
        doomed = run.prune(store, rows, dry_run=False)
        assert {r.listing.id for r in doomed} == {lst.id for lst in listings}
        assert store.list() == []


def _eu2_sftp_sessions(sandbox) -> list[int]:
    r = sandbox.ns_exec(["ss", "-Htnp", "state", "established", "( sport = :22 )"], netns="dn-eu2")
    import re

    return sorted({int(p) for p in re.findall(r"pid=(\d+)", r.stdout.decode())})


def test_list_and_prune_apply_retention_per_series(bk, pg_super):
    settings, env = bk
    generate(pg_super, tenants=2, events=10)
    first = run.run_backup(settings, env)
    second = run.run_backup(settings, env)
    t = run.run_backup(settings, env, tenant="shop-0001")
    with run.open_store(settings) as store:
        rows = run.plan(settings, env, store)
        by_id = {r.listing.id: r for r in rows}
        assert set(by_id) == {first.id, second.id, t.id}
        # same UTC day: the day's newest platform backup is kept; the first is the month's first
        assert by_id[t.id].decision.keep
        assert by_id[second.id].decision.tier == "daily"
        assert by_id[first.id].decision.tier == "monthly"
        d = by_id[second.id].to_dict(datetime.now(timezone.utc))
        assert d["size"] == second.size and d["verified"] is False and d["tier"] == "daily"
        # with no monthly copies the first one goes, in a dry run nothing is removed
        short = settings.model_copy(update={"retention": settings.retention.model_copy(update={"backup_monthly_months": 0})})
        doomed = run.prune(store, run.plan(short, env, store), dry_run=True)
        assert [r.listing.id for r in doomed] == [first.id]
        assert len(store.list()) == 3
        run.prune(store, run.plan(short, env, store), dry_run=False)
        assert {lst.id for lst in store.list()} == {second.id, t.id}


def test_shred_destroys_tenant_keys_here_and_in_escrow(bk, pg_super, sandbox):
    from dn.config import Settings

    settings, env = bk
    # the keystore of every configured host is shredded too: the sandbox EU host, with a data dir
    # of this test's own for its timers
    host = {**sandbox.settings.host().model_dump(mode="json"), "dn_data_dir": f"/var/lib/dn-test-{uuid.uuid4().hex[:10]}"}
    settings = Settings.model_validate({**settings.model_dump(mode="json"), "hosts": {"sandbox-eu1": host},
                                        "default_host": "sandbox-eu1"})
    generate(pg_super, tenants=2, events=10)
    m = run.run_backup(settings, env, tenant="shop-0001")
    owner = m.key.owner
    ks = keys.keystore(settings, env)
    assert ks.lookup(bytes.fromhex(m.key.id)) is not None
    done = run.shred(settings, env, "shop-0001", owner)
    assert done["key_ids"] == [m.key.id] and done["escrow_removed"]
    assert done["owners"] == [owner, "tenant-shop-0001"]
    assert [c["keystore"] for c in done["checked"]] == ["operator", "host sandbox-eu1", "escrow eu-de-2"]
    assert ks.lookup(bytes.fromhex(m.key.id)) is None
    with run.open_store(settings) as store:
        assert store.get_key(owner) is None
        assert store.destroyed_key_ids() == {m.key.id: owner}
        rows = run.plan(settings, env, store)
        (row,) = [r for r in rows if r.listing.id == m.id]
        assert row.decision.tier == "shredded" and not row.decision.keep
    # a fresh machine with only the passphrase cannot get the key back from the escrow either
    fresh = settings.model_copy(update={"data_dir": settings.data_dir / "fresh"})
    with run.open_store(fresh) as store:
        assert store.get_key(owner) is None
    assert run.shred(settings, env, "shop-0001", owner)["key_ids"] == [m.key.id]  # idempotent
    h = settings.host()
    shutil.rmtree(h.path(h.dn_data_dir), ignore_errors=True)


def test_manifest_is_uploaded_last(bk, pg_super):
    settings, env = bk
    generate(pg_super, tenants=1, events=5)
    m = run.run_backup(settings, env)
    with run.open_store(settings) as store:
        d = f"{store.root}/{m.id}"
        attrs = {a.filename: a for a in store.sftp.listdir_attr(d)}
        assert set(attrs) == {"manifest.json", "platform.dump.enc"}
        assert attrs["manifest.json"].st_mtime >= attrs["platform.dump.enc"].st_mtime
        assert Manifest.from_json(store._get_small(f"{d}/manifest.json"), "t").id == m.id
