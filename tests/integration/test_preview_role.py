"""The read-only preview identity (dn/schema/007_preview_role.sql), on the real PostgreSQL: a login
role that is a member of ``dn_preview`` — what CI's pull-request preview connects as, and so what a
hostile pull request holds — reads the tenant registry the way ``dn preview`` does and can do
nothing else: no write to any table, no other table's rows, no privileged function.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest
from psycopg import errors as pgerrors
from psycopg import sql

from dn import db, tenants
from tests.fixtures.postgres import _cluster_lock

pytestmark = pytest.mark.postgres

REGISTRY = {"tenants", "tenant_settings"}


@pytest.fixture
def preview_login(pg_cluster, pg_database, tmp_path):
    """A login role of this session that is a member of dn_preview only, and its passfile."""
    role = f"dn_ci_preview_{os.getpid()}"
    password = secrets.token_urlsafe(24)
    passfile = tmp_path / "pgpass"
    fd = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"127.0.0.1:{pg_cluster.port}:*:{role}:{password}\n")
    with _cluster_lock(), db.connect_dsn(pg_cluster.dsn("postgres", pg_database), pg_cluster.passfile) as c:
        c.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
        c.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
            sql.Identifier(role), sql.Literal(password), sql.Identifier(db.PREVIEW_ROLE)))
    yield role, passfile
    with _cluster_lock(), db.connect_dsn(pg_cluster.dsn("postgres", pg_database), pg_cluster.passfile) as c:
        c.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_preview_role_reads_the_registry_as_dn_preview_does(pg_cluster, pg_database, pg_super, dn_settings,
                                                            preview_login):
    role, passfile = preview_login
    tid = pg_super.execute("INSERT INTO tenants (slug, display_name, host) VALUES ('prv', 'Preview s.r.o.', "
                           "'test-eu1') RETURNING id").fetchone()[0]
    pg_super.execute("INSERT INTO tenant_settings (tenant_id, key, value) VALUES (%s, 'dn.domains', "
                     "'[\"gtm.prv.example\"]')", (tid,))
    pg_super.execute("INSERT INTO tenant_containers (tenant_id, container_config_ciphertext, fernet_key_id) "
                     "VALUES (%s, 'gAAAAAnot-a-real-token', 'k1')", (tid,))
    with db.connect_dsn(pg_cluster.dsn(role, pg_database), passfile, application_name="dn preview") as conn:
        # exactly the reads of `dn preview --all` (cli/preview.py, tenants.open_target)
        sel = tenants.targets(dn_settings, conn, all_=True)
        assert [(t.kind, t.name) for t in sel] == [("host", "test-eu1"), ("tenant", "prv")]
        rec = tenants.require_tenant(conn, "prv")
        assert rec.domains == ["gtm.prv.example"] and rec.host == "test-eu1"
        assert [r.slug for r in tenants.list_tenants(conn, host="test-eu1")] == ["prv"]

        refused = [
            ("INSERT INTO tenants (slug, display_name, host) VALUES ('evil', 'e', 'test-eu1')", ()),
            ("UPDATE tenants SET host = 'elsewhere'", ()),
            ("DELETE FROM tenant_settings", ()),
            ("UPDATE tenant_settings SET value = '[]'", ()),
            ("SELECT container_config_ciphertext FROM tenant_containers", ()),
            ("SELECT password_hash FROM users", ()),
            ("SELECT key_ciphertext FROM api_keys", ()),
            ("SELECT cancelled_at FROM tenants", ()),
            ("SELECT * FROM audit_log", ()),
            ("INSERT INTO op_locks (resource) VALUES ('tenant:prv')", ()),
            ("TRUNCATE tenants", ()),
        ]
        for stmt, params in refused:
            with pytest.raises(pgerrors.InsufficientPrivilege):
                conn.execute(stmt, params)


def test_preview_role_may_write_nothing_and_read_only_the_registry(pg_super):
    role = db.PREVIEW_ROLE
    rows = pg_super.execute("""
        SELECT c.relname,
               has_table_privilege(%(r)s, c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER') AS writes,
               has_any_column_privilege(%(r)s, c.oid, 'SELECT') AS reads
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')""", {"r": role}).fetchall()
    assert len(rows) > len(REGISTRY)  # the schema is there: the check below looks at every relation
    assert [name for name, writes, _ in rows if writes] == []
    assert {name for name, _, reads in rows if reads} == REGISTRY
    definers = pg_super.execute("""
        SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'public' AND p.prosecdef AND has_function_privilege(%s, p.oid, 'EXECUTE')""",
                                (role,)).fetchall()
    assert definers == []
    (login, member_of_app) = pg_super.execute(
        "SELECT rolcanlogin, pg_has_role(%s, %s, 'MEMBER') FROM pg_roles WHERE rolname = %s",
        (role, db.APP_ROLE, role)).fetchone()
    assert login is False and member_of_app is False


def _verify(settings):
    from dn.verify.access import check_preview_read_only
    from dn.verify.probe import Probe

    with Probe(settings) as probe:
        return check_preview_read_only(probe)


def test_verify_shows_the_preview_identity_read_only_and_fails_a_widened_one(pg_super, dn_settings, preview_login):
    from dn.verify.core import Status

    role, _ = preview_login
    status, ev = _verify(dn_settings)
    assert status is Status.PASS, ev
    assert "dn_preview: reads tenant_settings, tenants; writes nothing" in ev[0]
    assert ev[1] == f"1 login role of the CI preview: {role}"
    widenings = [
        ("GRANT INSERT ON tenants TO dn_preview", "REVOKE INSERT ON tenants FROM dn_preview",
         "dn_preview may write tenants"),
        ("GRANT SELECT (password_hash) ON users TO dn_preview", "REVOKE SELECT (password_hash) ON users FROM dn_preview",
         "dn_preview may read users"),
        (f"GRANT dn_app TO {role}", f"REVOKE dn_app FROM {role}",
         f"{role} (a preview identity) is also a member of dn_app"),
    ]
    for grant, revoke, expected in widenings:
        with _cluster_lock():
            pg_super.execute(grant)
        try:
            status, ev = _verify(dn_settings)
            assert status is Status.FAIL and any(line.startswith(expected) for line in ev), (grant, ev)
        finally:
            with _cluster_lock():
                pg_super.execute(revoke)
    assert _verify(dn_settings)[0] is Status.PASS


@pytest.mark.engine
def test_dn_preview_runs_as_the_preview_role_with_no_ssh_key(pg_cluster, pg_database, pg_super, dn_settings_data,
                                                             preview_login, tmp_path):
    """`dn preview --all` as CI's preview job runs it: the database as a dn_preview member, the
    host's key file absent. The stacks are new here, so the providers' check runs (the diff of an
    existing resource is covered by tests/unit/test_preview_needs_no_key.py)."""
    import json
    import subprocess
    import sys

    from tests.fixtures.postgres import to_toml
    from tests.stacks.e2e import engine_missing

    why = engine_missing()
    if why:
        pytest.fail(why)
    role, passfile = preview_login
    data = json.loads(json.dumps(dn_settings_data))
    data["database"] = {"dsn": pg_cluster.dsn(role, pg_database), "passfile": str(passfile)}
    data["hosts"]["test-eu1"]["key_path"] = str(tmp_path / "no-such-key")
    data["hosts"]["test-eu1"]["admin_sources"] = ["192.0.2.0/24"]
    pf = tmp_path / "passphrase"
    pf.write_text("preview role test: seven calm herons\n")
    pf.chmod(0o600)
    data["secrets"] = {"passphrase_file": str(pf)}
    cfg = tmp_path / "preview.toml"
    cfg.write_text(to_toml(data) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DN_") and k not in ("CI", "GITHUB_ACTIONS")}
    env.update(DN_CONFIG=str(cfg), DN_HOME=data["data_dir"])
    def preview() -> dict:
        r = subprocess.run([sys.executable, "-c", "from cli.main import run; run()", "preview", "--all", "--format",
                            "json"], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        return json.loads(r.stdout)

    def state_files() -> dict[str, tuple[int, int]]:
        root = Path(data["data_dir"]) / "state"
        return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}

    doc = preview()
    assert [s["stack"] for s in doc["stacks"]] == ["host--test-eu1"] and not doc["stacks"][0]["error"], doc
    assert doc["totals"]["create"] > 0  # the baseline was previewed, resource by resource
    # the first preview created the (empty) stack; a preview of a stack that exists writes nothing
    # to the state backend (no lock, no checkpoint), so a read-only state credential serves it
    before = state_files()
    assert any(name.endswith("host--test-eu1.json") for name in before), before
    assert preview()["totals"] == doc["totals"]
    assert state_files() == before
    assert not (tmp_path / "no-such-key").exists()
