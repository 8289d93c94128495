"""The platform database adapter against a real PostgreSQL: connections, migrations, roles, schema."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest

from dn import audit, db
from dn.errors import ConfigError, ExitCode, InvalidInput, OperationFailed, Unreachable

pytestmark = pytest.mark.postgres
DN = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "dn")


def test_migrations_are_recorded_and_idempotent(dn_settings):
    assert db.migrate(dn_settings.database) == []  # the session fixture already applied them
    st = db.status(dn_settings.database)
    assert st.current and st.pending == []
    assert [(a.version, a.name) for a in st.applied] == [(m.version, m.name) for m in db.migrations()]
    assert all(a.sha256 == m.sha256 for a, m in zip(st.applied, db.migrations()))
    assert st.role == "dn" and st.audit_head == 0 and st.locks_held == 0


def test_migration_files_are_numbered():
    names = [m.filename for m in db.migrations()]
    assert names == sorted(names) and names[:3] == ["001_platform.sql", "002_audit.sql", "003_locks.sql"]


@pytest.mark.parametrize("bad", ["1_x.sql", "004-x.sql", "004_Upper.sql"])
def test_misnamed_migration_file_is_refused(tmp_path, bad):
    (tmp_path / "001_ok.sql").write_text("SELECT 1;")
    (tmp_path / bad).write_text("SELECT 1;")
    with pytest.raises(ConfigError, match="NNN_name.sql"):
        db.migrations(tmp_path)


def _schema_copy(tmp_path: Path) -> Path:
    d = tmp_path / "schema"
    shutil.copytree(db.SCHEMA_DIR, d)
    return d


def test_changed_applied_migration_is_refused(dn_settings, tmp_path):
    d = _schema_copy(tmp_path)
    (d / "001_platform.sql").write_text((d / "001_platform.sql").read_text() + "\n-- edited\n")
    with pytest.raises(OperationFailed, match="001_platform.sql was changed after it was applied"):
        db.migrate(dn_settings.database, schema_dir=d)
    with pytest.raises(OperationFailed, match="changed after it was applied"):
        db.status(dn_settings.database, schema_dir=d)


def test_failing_migration_is_rolled_back_entirely(dn_settings, pg_super, tmp_path):
    d = _schema_copy(tmp_path)
    (d / "900_broken.sql").write_text("CREATE TABLE half_applied (x int);\nSELECT 1 / 0;\n")
    with pytest.raises(OperationFailed, match="900_broken.sql failed and was rolled back: division by zero"):
        db.migrate(dn_settings.database, schema_dir=d)
    assert pg_super.execute("SELECT to_regclass('public.half_applied')").fetchone()[0] is None
    assert pg_super.execute("SELECT count(*) FROM schema_migrations WHERE version = 900").fetchone()[0] == 0
    st = db.status(dn_settings.database, schema_dir=d)
    assert st.pending == ["900_broken.sql"] and not st.current


def test_unreachable_database_names_target_and_hint(dn_settings):
    cfg = dn_settings.database.model_copy(update={"dsn": "postgresql://dn@127.0.0.1:1/dn"})
    with pytest.raises(Unreachable) as ei:
        db.connect(cfg)
    assert "dn@127.0.0.1:1/dn" in str(ei.value) and "passfile" in ei.value.hint
    assert ei.value.exit_code == ExitCode.UNREACHABLE


def test_wrong_password_is_unreachable_without_leaking_passwords(dn_settings, tmp_path):
    bad = tmp_path / "pgpass"
    real = Path(dn_settings.database.passfile).read_text()
    bad.write_text("\n".join(line.rsplit(":", 1)[0] + ":not-the-password" for line in real.splitlines()) + "\n")
    bad.chmod(0o600)
    cfg = dn_settings.database.model_copy(update={"passfile": bad})
    with pytest.raises(Unreachable) as ei:
        db.connect(cfg)
    msg = f"{ei.value} {ei.value.hint}"
    assert "password authentication failed" in msg
    for line in real.splitlines():
        assert line.rsplit(":", 1)[1] not in msg
    assert "not-the-password" not in msg


@pytest.mark.parametrize("dsn, rule", [
    ("postgresql://postgres:hunter2@127.0.0.1:5432/dn", "must not contain a password"),
    ("host=127.0.0.1 user=postgres password=hunter2", "must not contain a password"),
    ("postgresql://127.0.0.1:5432/dn", "must name the role"),
    ("not a dsn = = =", "is not a PostgreSQL connection string"),
])
def test_bootstrap_dsn_is_checked(dsn, rule):
    with pytest.raises(InvalidInput) as ei:
        db.check_dsn(dsn, "--bootstrap-dsn")
    assert ei.value.field == "--bootstrap-dsn" and rule in ei.value.rule
    assert "hunter2" not in str(ei.value)


def test_missing_roles_are_named_with_the_fix(dn_settings):
    # dn_owner may not create roles, so a login role that does not exist cannot be set up by it.
    cfg = dn_settings.database.model_copy(update={"dsn": dn_settings.database.dsn.replace("//dn@", "//dn_nobody@")})
    with pytest.raises(OperationFailed) as ei:
        db.migrate(cfg)
    assert "login role dn_nobody" in str(ei.value) and "dn_nobody as member of dn_app" in str(ei.value)
    assert "CREATE ROLE dn_audit_owner NOLOGIN" in ei.value.hint and "--bootstrap-dsn" in ei.value.hint


def test_roles_and_ownership(pg_super):
    roles = dict(pg_super.execute(
        "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname IN ('dn_audit_owner', 'dn_app', 'dn')").fetchall())
    assert roles == {"dn_audit_owner": False, "dn_app": False, "dn": True}
    owners = dict(pg_super.execute(
        "SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'").fetchall())
    assert owners["audit_log"] == owners["audit_anchor"] == owners["audit_head"] == "dn_audit_owner"
    assert owners["tenants"] == owners["op_locks"] == owners["schema_migrations"] == "dn_owner"
    # Nothing in the schema belongs to the day-to-day role, and it cannot create anything.
    assert "dn" not in owners.values()


def test_app_role_cannot_change_schema_or_migrations(dn_settings):
    with db.connect(dn_settings.database) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("CREATE TABLE sneaky (x int)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("DELETE FROM schema_migrations")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("ALTER TABLE tenants ADD COLUMN x int")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("UPDATE op_locks SET pid = 1")


def _pbkdf2(password: str) -> str:
    salt = "s" * 22
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), 600_000)
    return f"pbkdf2_sha256$600000${salt}${base64.b64encode(digest).decode()}"


def test_platform_schema_holds_a_tenant_and_deletes_in_batches(dn_settings):
    from cryptography.fernet import Fernet

    f = Fernet(Fernet.generate_key())
    now = datetime.now(timezone.utc)
    with db.connect(dn_settings.database) as c:
        tid = c.execute("INSERT INTO tenants (slug, display_name, host) VALUES ('acme', 'Acme s.r.o.', 'test-eu1')"
                        " RETURNING id").fetchone()[0]
        uid = c.execute("INSERT INTO users (tenant_id, email, name, password_hash, role) VALUES (%s, %s, %s, %s, 'owner')"
                        " RETURNING id", (tid, "jana@acme.example", "Jana", _pbkdf2("pw"))).fetchone()[0]
        c.execute("INSERT INTO api_keys (tenant_id, key_id, key_ciphertext, fernet_key_id, created_by)"
                  " VALUES (%s, 'k_12345678', %s, 'fk1', %s)", (tid, f.encrypt(b"api-key").decode(), uid))
        c.execute("INSERT INTO tenant_containers (tenant_id, container_config_ciphertext, fernet_key_id) VALUES (%s, %s, 'fk1')",
                  (tid, f.encrypt(b"aWQ9R1RNLVhYWFg=").decode()))
        c.execute("INSERT INTO tenant_settings (tenant_id, key, value) VALUES (%s, 'consent.mode', %s)",
                  (tid, db.jsonb({"default": "denied"})))
        c.execute("INSERT INTO gtm_workspaces (tenant_id, version, workspace) VALUES (%s, 1, %s)",
                  (tid, db.jsonb({"containerVersion": {"tag": []}})))
        c.execute("INSERT INTO events (tenant_id, occurred_at, event_name, client_ip, user_agent, cookie_id, payload)"
                  " SELECT %s, %s - make_interval(days => g %% 20), 'page_view', '192.0.2.1', 'UA', 'c' || g,"
                  " jsonb_build_object('value', g) FROM generate_series(1, 200) g", (tid, now))
        c.execute("INSERT INTO hourly_stats (tenant_id, hour, requests) VALUES (%s, date_trunc('hour', now()), 10)", (tid,))
        c.execute("INSERT INTO invoices (tenant_id, number, issued_at, amount, currency, billing_name, billing_address)"
                  " VALUES (%s, '2026-0001', current_date, 49.00, 'EUR', 'Acme s.r.o.', 'Praha')", (tid,))
        c.execute("INSERT INTO deletion_requests (tenant_id, due_at) VALUES (%s, now() + interval '30 days')", (tid,))
        # Retention by time and finding a tenant's rows (what its batched deletion selects) use
        # their indexes. Asked without an ORDER BY id LIMIT, so that walking the primary key and
        # filtering is never as cheap (with one and the tenant alone in the table, it may be).
        other = c.execute("INSERT INTO tenants (slug, display_name, host) VALUES ('bulk', 'Bulk', 'test-eu1')"
                          " RETURNING id").fetchone()[0]
        c.execute("INSERT INTO events (tenant_id, occurred_at, event_name, payload)"
                  " SELECT %s, %s, 'page_view', '{}'::jsonb FROM generate_series(1, 5000)", (other, now))
        c.execute("ANALYZE events")
        c.execute("SET enable_seqscan = off")
        plan = " ".join(r[0] for r in c.execute(
            "EXPLAIN SELECT id FROM events WHERE tenant_id = %s", (tid,)).fetchall())
        assert "events_tenant_id_idx" in plan
        plan = " ".join(r[0] for r in c.execute(
            "EXPLAIN DELETE FROM events WHERE occurred_at < now() - interval '15 days'").fetchall())
        assert "events_occurred_at_idx" in plan
        c.execute("RESET enable_seqscan")
        n = c.execute("DELETE FROM events WHERE occurred_at < %s", (now - timedelta(days=15),)).rowcount
        assert n == 40  # days 15..19 of the 20-day spread
        # Deleting a tenant is an explicit job: its rows block a silent cascade.
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            c.execute("DELETE FROM tenants WHERE id = %s", (tid,))
        with pytest.raises(psycopg.errors.CheckViolation):
            c.execute("INSERT INTO api_keys (tenant_id, key_id, key_ciphertext, fernet_key_id)"
                      " VALUES (%s, 'k_plaintext', 'the-api-key-in-clear', 'fk1')", (tid,))
        with pytest.raises(psycopg.errors.CheckViolation):
            c.execute("INSERT INTO users (tenant_id, email, password_hash) VALUES (%s, 'x@y.example', 'md5abc')", (tid,))


def _cli(args, env, **kw):
    return subprocess.run([DN, *args], env=env, capture_output=True, text=True, timeout=120, **kw)


def test_cli_db_init_is_idempotent_and_audited(dn_cli_env, dn_ctx):
    r = _cli(["db", "init"], dn_cli_env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and "schema up to date (0 migration(s) applied now)" in r.stderr
    (e,) = audit.show(dn_ctx)
    assert (e.command, e.outcome, e.exit_code, e.args["applied"]) == ("db init", "ok", 0, [])


def test_cli_db_status(dn_cli_env):
    r = _cli(["db", "status", "--json"], dn_cli_env)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["current"] and st["pending"] == [] and st["role"] == "dn"
    assert [a["name"] for a in st["applied"]] == [m.name for m in db.migrations()]
    r = _cli(["db", "status"], dn_cli_env)
    assert r.returncode == 0 and "applied:      002_audit.sql" in r.stdout


def test_cli_db_status_unreachable_is_exit_3(dn_cli_env):
    env = dict(dn_cli_env, DN__DATABASE__DSN="postgresql://dn@127.0.0.1:1/dn")
    r = _cli(["db", "status"], env)
    assert r.returncode == ExitCode.UNREACHABLE, r.stderr
    assert "dn@127.0.0.1:1/dn" in r.stderr and "Traceback" not in r.stderr


def test_cli_db_init_bootstrap_dsn(dn_cli_env, dn_ctx, pg_cluster, pg_database):
    r = _cli(["db", "init", "--bootstrap-dsn", pg_cluster.dsn("postgres", pg_database)], dn_cli_env)
    assert r.returncode == 0, r.stderr
    (e,) = audit.show(dn_ctx)
    assert e.args["bootstrap_roles"] is True and e.outcome == "ok"
    r = _cli(["db", "init", "--bootstrap-dsn", "postgresql://postgres:hunter2@127.0.0.1:54330/dn"], dn_cli_env)
    assert r.returncode == ExitCode.INVALID
    assert "--bootstrap-dsn: must not contain a password" in r.stderr and "hunter2" not in r.stderr


def test_cli_db_init_on_an_empty_database_applies_everything_then_audits(pg_cluster, dn_cli_env, tmp_path,
                                                                        audit_region):
    from psycopg import sql

    name = f"dn_fresh_{os.getpid()}"
    with db.connect_dsn(pg_cluster.dsn("postgres", "postgres"), pg_cluster.passfile) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        c.execute(sql.SQL("CREATE DATABASE {} OWNER dn_owner").format(sql.Identifier(name)))
        c.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO dn").format(sql.Identifier(name)))
    try:
        env = dict(dn_cli_env, DN__DATABASE__DSN=pg_cluster.dsn("dn", name),
                   DN__DATABASE__ADMIN_DSN=pg_cluster.dsn("dn_owner", name))
        known = [m.filename for m in db.migrations()]
        assert known[:3] == ["001_platform.sql", "002_audit.sql", "003_locks.sql"]
        r = _cli(["db", "status"], env)
        assert r.returncode == ExitCode.POLICY and f"{len(known)} migration(s) pending" in r.stderr
        r = _cli(["db", "init"], env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == [f"applied {f}" for f in known]
        r = _cli(["audit", "show", "--json"], env)
        (e,) = json.loads(r.stdout)
        assert (e["seq"], e["command"], e["outcome"]) == (1, "db init", "ok")
        assert e["args"]["applied"] == known
        assert _cli(["db", "status"], env).returncode == 0
        assert _cli(["audit", "verify"], env).returncode == 0
    finally:
        with db.connect_dsn(pg_cluster.dsn("postgres", "postgres"), pg_cluster.passfile) as c:
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_bootstrap_grants_a_new_login_role_the_app_grants(pg_cluster, pg_database, pg_super, dn_settings):
    pg_super.execute("DROP ROLE IF EXISTS dn_probe")
    pg_super.execute("CREATE ROLE dn_probe LOGIN")
    try:
        assert not pg_super.execute("SELECT pg_has_role('dn_probe', 'dn_app', 'MEMBER')").fetchone()[0]
        db.bootstrap_roles(pg_cluster.dsn("postgres", pg_database), pg_cluster.passfile, owner="dn_owner",
                           app_login="dn_probe")
        assert pg_super.execute("SELECT pg_has_role('dn_probe', 'dn_app', 'MEMBER')").fetchone()[0]
        assert pg_super.execute("SELECT has_table_privilege('dn_probe', 'audit_log', 'INSERT'),"
                                " has_table_privilege('dn_probe', 'audit_log', 'UPDATE')").fetchone() == (True, False)
        db.bootstrap_roles(pg_cluster.dsn("postgres", pg_database), pg_cluster.passfile, owner="dn_owner",
                           app_login="dn_probe")  # idempotent
    finally:
        pg_super.execute("DROP ROLE dn_probe")
    with pytest.raises(InvalidInput, match="database.dsn: role 'Robert\"; DROP' must match"):
        db.role_setup_sql("dn_owner", 'Robert"; DROP')
