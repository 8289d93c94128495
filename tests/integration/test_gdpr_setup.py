"""Shared set-up of the GDPR, retention, export and key tests: realistic platform data for several
tenants (with real Fernet tokens), settings that combine the test database with the sandbox EU
host and a private directory in its backup region, and helpers that scan and snapshot tables.

The fixtures are imported by the test_gdpr*/test_retention*/test_export*/test_keys* modules;
this module's own tests check the data generator itself.
"""
from __future__ import annotations

import os
import secrets
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

from tests.fixtures.sandbox import remove_backup_dir

PASSPHRASE = "gdpr tests: a passphrase long enough for scrypt"
HOST = "sandbox-eu1"
PLATFORM_TABLES = ("tenants", "users", "api_keys", "tenant_containers", "tenant_settings", "gtm_workspaces",
                   "events", "hourly_stats", "invoices", "deletion_requests")


def fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


@dataclass
class Env:
    settings: Any
    ctx: Any
    data: dict[str, Any]
    environ: dict[str, str]

    def connect(self):
        from dn import db

        return db.connect(self.settings.database, application_name="dn tests")


def wipe_gdpr(conn) -> None:
    from tests.fixtures.postgres import tampering

    with tampering(conn):
        conn.execute("TRUNCATE gdpr_steps, gdpr_runs, fernet_keys")


@pytest.fixture
def gdpr_env(sandbox, dn_settings_data, pg_super):
    """Settings on the test database with the sandbox host (eu1) and a private backup directory."""
    from dn.config import Settings
    from dn.context import Context

    wipe_gdpr(pg_super)
    path = f"/backups/test-gdpr-{uuid.uuid4().hex[:10]}"
    host = sandbox.settings.hosts[HOST].model_dump(mode="json")
    backup = {**sandbox.settings.backup.model_dump(mode="json"), "path": path, "retries": 1}
    data = {**dn_settings_data, "default_host": HOST, "hosts": {HOST: host}, "backup": backup}
    settings = Settings.model_validate({**data, "source": "tests/integration/test_gdpr_setup.py"})
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DN_") and k not in ("CI", "GITHUB_ACTIONS")}
    environ.update({"DN_PASSPHRASE": PASSPHRASE, "DN_FERNET_KEYS": fernet_key()})
    ctx = Context(environ=environ, _settings=settings)
    yield Env(settings, ctx, data, environ)
    remove_backup_dir(settings.backup, path)
    wipe_gdpr(pg_super)


# -- realistic data ------------------------------------------------------------------------------
def markers(slug: str) -> list[str]:
    """Strings found only in ``slug``'s personal and configuration data (never in invoices)."""
    return [f"{slug}-mail.example", f"Display {slug} GmbH", f"UA-{slug}/", f"ck-{slug}-", f"GTM-{slug.upper()}",
            f"Person of {slug}"]


def billing_marker(slug: str) -> str:
    return f"Billing {slug} s.r.o."


def add_tenant(conn, slug: str, environ: dict[str, str], *, host: str = HOST, **kw) -> int:
    """One tenant (see add_data for its rows). ``conn``: the day-to-day role, autocommit."""
    from dn import db

    r = db.row(conn, "INSERT INTO tenants (slug, display_name, plan, host, created_at) "
                     "VALUES (%s, %s, 'standard', %s, now() - interval '400 days') RETURNING id",
               (slug, f"Display {slug} GmbH", host))
    add_data(conn, r["id"], slug, environ, **kw)
    return r["id"]


def add_data(conn, tid: int, slug: str, environ: dict[str, str], *, events: int = 300, hours: int = 48,
             invoices: int = 3, event_age: timedelta = timedelta(0), container: bool = True) -> None:
    """A tenant's users (real Fernet-sealed MFA secrets), API keys and container config (real
    Fernet tokens), settings, GTM workspaces, tracking events with IPs, user agents and cookie
    ids, hourly statistics and invoices."""
    from dn import db
    from dn.gdpr.keys import keyring

    ring = keyring(environ)
    user_ids = []
    for u in range(1, 5):
        token, kid = ring.encrypt(secrets.token_bytes(20)) if u % 2 else (None, None)
        user_ids.append(db.row(conn, """
            INSERT INTO users (tenant_id, email, name, password_hash, role, totp_secret_ciphertext, totp_fernet_key_id,
                               last_login_at)
            VALUES (%s, %s, %s, %s, %s, %s, %s, now() - interval '1 day') RETURNING id""",
            (tid, f"user{u}@{slug}-mail.example", f"Person of {slug} #{u}",
             f"pbkdf2_sha256$600000${secrets.token_hex(8)}${secrets.token_urlsafe(32)}",
             ("owner", "admin", "member", "viewer")[u - 1], token, kid))["id"])
    for k in range(1, 3):
        token, kid = ring.encrypt(b"dnk_" + secrets.token_bytes(24))
        conn.execute("INSERT INTO api_keys (tenant_id, key_id, key_ciphertext, fernet_key_id, label, created_by) "
                     "VALUES (%s, %s, %s, %s, %s, %s)",
                     (tid, f"k_{slug[:20]}_{k}_{secrets.token_hex(4)}", token, kid, f"key {k}", user_ids[0]))
    if container:
        token, kid = ring.encrypt(b"aWQ9R1RNLVRFU1QmZW52PTEmYXV0aD14eXo=")
        conn.execute("INSERT INTO tenant_containers (tenant_id, container_config_ciphertext, fernet_key_id, replicas) "
                     "VALUES (%s, %s, %s, 2)", (tid, token, kid))
    conn.execute("INSERT INTO tenant_settings (tenant_id, key, value) VALUES (%s, 'tracking.consent_mode', %s), "
                 "(%s, 'contact.name', %s)", (tid, db.jsonb({"enabled": True}), tid, db.jsonb(f"Person of {slug} #1")))
    for v in (1, 2):
        conn.execute("INSERT INTO gtm_workspaces (tenant_id, version, workspace) VALUES (%s, %s, %s)",
                     (tid, v, db.jsonb({"containerId": f"GTM-{slug.upper()}", "version": v,
                                        "tags": [{"name": "GA4", "type": "gaawc"}]})))
    conn.execute("""
        INSERT INTO events (tenant_id, occurred_at, event_name, client_ip, user_agent, cookie_id, payload)
        SELECT %(t)s, now() - %(age)s - (e || ' seconds')::interval,
               (ARRAY['page_view', 'add_to_cart', 'begin_checkout', 'purchase'])[1 + e %% 4],
               ('10.' || (e %% 250) || '.' || (%(t)s %% 250) || '.' || (1 + e %% 200))::inet,
               'UA-' || %(slug)s || '/Mozilla/5.0 (X11; Linux x86_64) Firefox/' || (100 + e %% 30),
               'ck-' || %(slug)s || '-' || md5(e::text),
               jsonb_build_object('value', round((e %% 500)::numeric * 1.37, 2), 'currency', 'CZK',
                                  'items', jsonb_build_array(jsonb_build_object('sku', 'SKU-' || (e %% 50), 'qty', 1 + e %% 3)))
        FROM generate_series(1, %(n)s) e""", {"t": tid, "slug": slug, "n": events, "age": event_age})
    conn.execute("""
        INSERT INTO hourly_stats (tenant_id, hour, requests, errors, rate_limited, bytes_in, bytes_out, p95_ms)
        SELECT %(t)s, date_trunc('hour', now()) - (h || ' hours')::interval, 1000 + h %% 77, h %% 5, h %% 3,
               200000 + h, 900000 + h, 40 + h %% 60
        FROM generate_series(1, %(n)s) h""", {"t": tid, "n": hours})
    conn.execute("""
        INSERT INTO invoices (tenant_id, number, issued_at, due_at, paid_at, amount, vat_amount, currency,
                              billing_name, billing_address, billing_vat_id)
        SELECT %(t)s, 'DN-' || %(t)s || '-' || i, current_date - i * 30, current_date - i * 30 + 14,
               current_date - i * 30 + 7, 990 + i, round((990 + i) * 0.21, 2), 'CZK',
               %(bill)s, 'Ulice ' || %(t)s || ', Praha', 'CZ' || (10000000 + %(t)s)
        FROM generate_series(1, %(n)s) i""", {"t": tid, "n": invoices, "bill": billing_marker(slug)})


def add_request(conn, tenant_id: int, received_days_ago: float = 2) -> int:
    from dn import db

    r = db.row(conn, "INSERT INTO deletion_requests (tenant_id, received_at, due_at) "
                     "VALUES (%s, now() - %s * interval '1 day', now() - %s * interval '1 day' + interval '30 days') "
                     "RETURNING id", (tenant_id, received_days_ago, received_days_ago))
    return r["id"]


def snapshot(conn, exclude_tenant: int | None = None) -> dict[str, list[tuple]]:
    """Every row of every platform table (all columns, stable order), without ``exclude_tenant``'s."""
    out = {}
    for table in PLATFORM_TABLES:
        col = "id" if table == "tenants" else "tenant_id"
        where = f" WHERE {col} <> {int(exclude_tenant)}" if exclude_tenant is not None else ""
        ncols = conn.execute("SELECT count(*) FROM information_schema.columns WHERE table_schema = 'public' "
                             "AND table_name = %s", (table,)).fetchone()[0]
        order = ", ".join(str(i) for i in range(1, ncols + 1))
        out[table] = conn.execute(f'SELECT * FROM "{table}"{where} ORDER BY {order}').fetchall()
    return out


def scan(conn, needle: str) -> dict[str, int]:
    """Rows of every table of the database whose text form contains ``needle``."""
    from dn.gdpr.datamap import read_catalog

    found = {}
    for table in sorted(read_catalog(conn).columns):
        q = f'SELECT count(*) FROM {".".join(chr(34) + p + chr(34) for p in table.split("."))} t WHERE t::text LIKE %s'
        n = conn.execute(q, (f"%{needle}%",)).fetchone()[0]
        if n:
            found[table] = n
    return found


# -- the generator's own checks ------------------------------------------------------------------
pytestmark = [pytest.mark.postgres]


def test_generator_makes_every_kind_of_row(dn_settings, pg_super):
    from dn import db
    from dn.gdpr.datamap import load

    environ = {"DN_FERNET_KEYS": fernet_key()}
    with db.connect(dn_settings.database) as conn:
        tid = add_tenant(conn, "gen-check", environ, events=50, hours=5, invoices=2)
        dm = load()
        for t in dm.tenant_bound():
            if t.tenant.kind == "column" and t.name in PLATFORM_TABLES and t.name != "deletion_requests":
                col = "id" if t.name == "tenants" else "tenant_id"
                n = conn.execute(f'SELECT count(*) FROM "{t.name}" WHERE {col} = %s', (tid,)).fetchone()[0]
                assert n > 0, f"the generator wrote no row into {t.name}"
        for m in markers("gen-check"):
            assert scan(conn, m), f"marker {m!r} is in no table"
        assert scan(conn, billing_marker("gen-check")) == {"invoices": 2}
        # the tokens are real: they decrypt with the environment's key
        from dn.gdpr.keys import keyring

        multi = keyring(environ).multi()
        for (tok,) in conn.execute("SELECT key_ciphertext FROM api_keys WHERE tenant_id = %s", (tid,)).fetchall():
            assert multi.decrypt(tok.encode()).startswith(b"dnk_")
