"""Restore drills and real restores: real PostgreSQL, real SFTP region, real damage."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from dn.backup import drill, keys, run
from dn.errors import ExitCode, InvalidInput
from tests.integration.test_backup import PASSPHRASE, bk, cheap_scrypt, generate, table_rows  # noqa: F401

pytestmark = [pytest.mark.postgres, pytest.mark.sandbox]
PLATFORM = ("tenants", "users", "api_keys", "tenant_containers", "tenant_settings", "gtm_workspaces", "events",
            "hourly_stats", "invoices", "deletion_requests")


def scratch_dbs(pg_super) -> list[str]:
    return [r[0] for r in pg_super.execute(
        "SELECT datname FROM pg_database WHERE datname LIKE 'dn\\_drill\\_%' OR datname LIKE 'dn\\_restore\\_%'")]


def _damage(settings, backup_id: str, how: str) -> None:
    with run.open_store(settings) as store:
        path = f"{store.root}/{backup_id}/platform.dump.enc"
        size = store.sftp.stat(path).st_size
        if how == "truncate":
            store.sftp.truncate(path, size - 4096)
        elif how == "bitflip":
            with store.sftp.open(path, "r+b") as f:
                f.seek(size // 2)
                b = f.read(1)
                f.seek(size // 2)
                f.write(bytes([b[0] ^ 0x04]))


def test_drill_restores_verifies_and_always_drops_scratch(bk, pg_super):
    settings, env = bk
    generate(pg_super)
    m = run.run_backup(settings, env)
    said = []
    report = drill.run_drill(settings, env, progress=said.append, notify=False)
    assert report["result"] == "passed", report
    assert report["backup"]["id"] == m.id and report["newest_backup"]["id"] == m.id
    assert 0 <= report["rpo_seconds"] < 120 and report["rto_seconds"] > 0
    assert report["tables"]["public.events"] == {"expected": m.tables["public.events"],
                                                 "restored": m.tables["public.events"], "ok": True}
    assert all(t["ok"] for t in report["tables"].values()) and all(c["ok"] for c in report["checks"])
    assert {c["name"] for c in report["checks"]} >= {"indexes are valid", "audit chain head matches the log"}
    assert report["scratch_database"] == drill.scratch_name(m.id) and report["scratch_dropped"]
    assert scratch_dbs(pg_super) == []
    assert not any((Path(settings.data_dir) / "dr" / "work").iterdir())
    # history and the verdict next to the backup
    assert drill.last_drill(settings)["drill_id"] == report["drill_id"]
    with run.open_store(settings) as store:
        (row,) = run.plan(settings, env, store)
        assert row.to_dict(datetime.now(timezone.utc))["verified"] is True
    assert "PASSED" in drill.summary(report)


def test_restore_is_row_for_row_identical_and_keeps_owners(bk, pg_super, pg_cluster, pg_database):
    settings, env = bk
    generate(pg_super, tenants=5, events=400)
    m = run.run_backup(settings, env)
    target = pg_cluster.dsn("dn_owner", f"dn_restored_{os.getpid()}")
    try:
        out = drill.restore(settings, env, backup_id=m.id, target_dsn=target)
        assert out["result"] == "restored" and "replaced" not in out
        from dn import db

        with db.connect_dsn(pg_cluster.dsn("postgres", f"dn_restored_{os.getpid()}"), pg_cluster.passfile) as c:
            for t in PLATFORM + ("audit_log", "schema_migrations"):
                assert table_rows(c, t) == table_rows(pg_super, t), t
            owners = dict(c.execute("SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'").fetchall())
            src = dict(pg_super.execute("SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'").fetchall())
            assert owners == src and owners["audit_log"] == "dn_audit_owner"
            acl = c.execute("SELECT has_schema_privilege('dn_audit_owner', 'public', 'CREATE'),"
                            " has_schema_privilege('dn', 'public', 'CREATE')").fetchone()
            assert acl == pg_super.execute("SELECT has_schema_privilege('dn_audit_owner', 'public', 'CREATE'),"
                                           " has_schema_privilege('dn', 'public', 'CREATE')").fetchone()
            # the append-only triggers came back with the data
            with pytest.raises(Exception, match="append-only"):
                c.execute("TRUNCATE audit_log")
        # a second restore into the now non-empty target is refused without --force ...
        with pytest.raises(InvalidInput, match="--target: database dn_restored_.* is not empty"):
            drill.restore(settings, env, backup_id=m.id, target_dsn=target)
        # ... and with it, the old database is kept under another name
        out = drill.restore(settings, env, backup_id=m.id, target_dsn=target, force=True)
        assert out["replaced"].startswith(f"dn_restored_{os.getpid()}_replaced_")
        assert scratch_dbs(pg_super) == []
    finally:
        for (name,) in pg_super.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                                        (f"dn\\_restored\\_{os.getpid()}%",)).fetchall():
            pg_super.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_tenant_backup_drills_and_restores_only_its_rows(bk, pg_super, pg_cluster):
    settings, env = bk
    generate(pg_super, tenants=3, events=60)
    run.run_backup(settings, env)  # the platform backup, so the RPO is fine
    t = run.run_backup(settings, env, tenant="shop-0003")
    report = drill.run_drill(settings, env, backup_id=t.id, notify=False)
    assert report["result"] == "passed", report
    assert report["tables"]["public.events"]["restored"] == 60
    target = pg_cluster.dsn("dn_owner", f"dn_tenant_{os.getpid()}")
    try:
        drill.restore(settings, env, backup_id=t.id, target_dsn=target)
        from dn import db

        with db.connect_dsn(pg_cluster.dsn("postgres", f"dn_tenant_{os.getpid()}"), pg_cluster.passfile) as c:
            assert c.execute("SELECT slug FROM tenants").fetchall() == [("shop-0003",)]
            tid = c.execute("SELECT id FROM tenants").fetchone()[0]
            assert table_rows(c, "events") == pg_super.execute(
                "SELECT * FROM events WHERE tenant_id = %s ORDER BY 1, 2, 3, 4, 5, 6, 7, 8", (tid,)).fetchall()
            # identity sequences moved past the restored ids: a new row does not collide
            c.execute("INSERT INTO events (tenant_id, event_name) VALUES (%s, 'page_view')", (tid,))
    finally:
        pg_super.execute(f'DROP DATABASE IF EXISTS "dn_tenant_{os.getpid()}" WITH (FORCE)')


@pytest.mark.parametrize("how", ["truncate", "bitflip"])
def test_damaged_backup_fails_the_drill_naming_the_artifact(bk, pg_super, how):
    settings, env = bk
    generate(pg_super, tenants=3, events=2000)
    m = run.run_backup(settings, env)
    _damage(settings, m.id, how)
    cmd = [sys.executable, "-c", "import sys, json; json.load(sys.stdin); open(sys.argv[1], 'w').write('alerted')",
           str(Path(settings.data_dir) / "alert.out")]
    settings = settings.model_copy(update={"alert": settings.alert.model_copy(update={"command": cmd})})
    report = drill.run_drill(settings, env)
    assert report["result"] == "failed"
    assert any(f"platform.dump.enc of backup {m.id}" in f for f in report["failures"]), report["failures"]
    assert (Path(settings.data_dir) / "alert.out").read_text() == "alerted"
    assert report["alerts"] == [f"alert command {sys.executable} ran"]
    assert "scratch_database" not in report  # nothing was restored from a damaged file
    assert scratch_dbs(pg_super) == []
    with run.open_store(settings) as store:
        (row,) = run.plan(settings, env, store)
        assert row.to_dict(datetime.now(timezone.utc))["verified"] is False
        assert row.listing.drill["ok"] is False


def test_missing_or_wrong_key_fails_before_any_restore(bk, pg_super):
    settings, env = bk
    generate(pg_super, tenants=1, events=20)
    m = run.run_backup(settings, env)
    # another machine with the right passphrase gets the key from the escrow: the drill passes
    other = settings.model_copy(update={"data_dir": Path(settings.data_dir) / "other-machine"})
    (Path(other.data_dir)).mkdir()
    assert drill.run_drill(other, env, notify=False)["result"] == "passed"
    # a wrong passphrase cannot unlock it
    wrong = settings.model_copy(update={"data_dir": Path(settings.data_dir) / "wrong-pass"})
    Path(wrong.data_dir).mkdir()
    report = drill.run_drill(wrong, {"DN_PASSPHRASE": "not the passphrase"}, notify=False)
    assert report["result"] == "failed" and "passphrase does not unlock" in " ".join(report["failures"])
    # a keystore whose key under that id is a different key: the manifest does not authenticate
    ks_dir = Path(settings.data_dir) / "backup-keys"
    swapped = settings.model_copy(update={"data_dir": Path(settings.data_dir) / "swapped"})
    Path(swapped.data_dir).mkdir()
    forged = keys.KeyStore(Path(swapped.data_dir) / "backup-keys", lambda: PASSPHRASE.encode())
    forged.create("platform")
    fp = Path(swapped.data_dir) / "backup-keys" / "platform.json"
    doc = json.loads(fp.read_text())
    assert doc["keys"][0]["id"] != m.key.id and ks_dir.exists()
    # the backup's key id, wrapped properly, around another key (a missing id would be fetched
    # from the escrow instead)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    blob = nonce + AESGCM(forged._kek(doc["kdf"])).encrypt(nonce, os.urandom(32), keys.KeyStore._ad("platform", m.key.id))
    doc["keys"][0].update(id=m.key.id, wrapped=keys._b64(blob))
    fp.write_text(json.dumps(doc))
    report = drill.run_drill(swapped, env, backup_id=m.id, notify=False)
    assert report["result"] == "failed"
    assert any("key" in f for f in report["failures"])
    assert "scratch_database" not in report and scratch_dbs(pg_super) == []


def test_stale_backup_is_an_rpo_breach_in_drill_and_status(bk, pg_super):
    settings, env = bk
    generate(pg_super, tenants=1, events=20)
    run.run_backup(settings, env)
    strict = timedelta(seconds=0)
    report = drill.run_drill(settings, env, max_rpo=strict, notify=False)
    assert report["result"] == "breach" and report["breaches"][0].startswith("RPO: the newest backup is")
    later = datetime.now(timezone.utc) + timedelta(hours=25)
    st = drill.status(settings, env, now=later)
    assert any(a.startswith("RPO breach: the newest backup is 25.") for a in st["alarms"]), st["alarms"]
    assert st["last_backup"]["age_seconds"] >= 25 * 3600
    st = drill.status(settings, env)
    assert not any("RPO" in a for a in st["alarms"]) and st["drill_overdue"] is False
    # two months on, with no drill since, the monthly drill is overdue
    st = drill.status(settings, env, now=datetime.now(timezone.utc) + timedelta(days=62))
    assert st["drill_overdue"] and any("overdue" in a for a in st["alarms"])


def test_scratch_database_is_dropped_when_checks_fail(bk, pg_super):
    settings, env = bk
    generate(pg_super, tenants=2, events=30)
    run.run_backup(settings, env)
    failing = drill.load_checks(None) + [drill.Check("no tenants at all", "SELECT id FROM tenants")]
    report = drill.run_drill(settings, env, checks=failing, notify=False)
    assert report["result"] == "failed" and "sanity check 'no tenants at all': 2 violation(s)" in report["failures"]
    assert report["scratch_dropped"] and scratch_dbs(pg_super) == []


def test_sigterm_mid_restore_drops_the_scratch_database(bk, pg_super, dn_settings_data, tmp_path):
    settings, env = bk
    generate(pg_super, tenants=8, events=20000)
    run.run_backup(settings, env)
    code = (
        "import sys, json\n"
        "from dn.config import Settings\n"
        "from dn.backup import drill, keys\n"
        "keys.SCRYPT_N = 1 << 12\n"
        "s = Settings.model_validate(json.loads(sys.argv[1]))\n"
        "try:\n"
        "    drill.run_drill(s, {'DN_PASSPHRASE': sys.argv[2]}, notify=False)\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, settings.model_dump_json(), PASSPHRASE],
                            cwd=str(Path(__file__).resolve().parents[2]))
    try:
        deadline = time.monotonic() + 120
        while not scratch_dbs(pg_super):
            assert proc.poll() is None, "the drill ended before its scratch database existed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    assert scratch_dbs(pg_super) == []
    last = drill.last_drill(settings)
    assert last["result"] == "failed" and last.get("interrupted") and last["scratch_dropped"]


def test_crashed_drill_leftovers_are_dropped_by_the_next_drill(bk, pg_super):
    settings, env = bk
    generate(pg_super, tenants=1, events=10)
    run.run_backup(settings, env)
    from dn import db

    pg_super.execute('DROP DATABASE IF EXISTS "dn_drill_19990101t000000z_abcdef"')
    # what a drill killed with SIGKILL leaves: a scratch database of the owner role
    with db.connect_dsn(settings.database.admin_dsn, settings.database.passfile) as c:
        c.execute('CREATE DATABASE "dn_drill_19990101t000000z_abcdef"')
    said = []
    report = drill.run_drill(settings, env, progress=said.append, notify=False)
    assert report["result"] == "passed"
    assert any("dn_drill_19990101t000000z_abcdef" in s for s in said)
    assert scratch_dbs(pg_super) == []


# -- the swap of a real restore -------------------------------------------------------------------
def _databases(pg_super, prefix: str) -> list[str]:
    return [r[0] for r in pg_super.execute("SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY 1",
                                           (prefix.replace("_", "\\_") + "%",)).fetchall()]


def _has_table(pg_cluster, dbname: str, table: str) -> bool:
    from dn import db

    with db.connect_dsn(pg_cluster.dsn("postgres", dbname), pg_cluster.passfile) as c:
        return c.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0]


def test_a_failed_second_rename_leaves_the_target_and_keeps_the_verified_restore(bk, pg_super, pg_cluster):
    """The second rename of the swap fails for real (a client sits in the staging database):
    nothing is renamed, the old database keeps its name, the verified staging copy is kept, and
    a rerun swaps that copy in without restoring again."""
    from dn import db
    from dn.errors import OperationFailed

    settings, env = bk
    generate(pg_super, tenants=2, events=50)
    m = run.run_backup(settings, env)
    name = f"dn_swap_{os.getpid()}"
    target = pg_cluster.dsn("dn_owner", name)
    staging = "dn_restore_" + m.id.lower().replace("-", "_")
    blockers = []

    def sit_in_staging(msg: str) -> None:
        if msg == f"restored into {staging}":
            blockers.append(db.connect_dsn(pg_cluster.dsn("postgres", staging), pg_cluster.passfile))

    try:
        drill.restore(settings, env, backup_id=m.id, target_dsn=target)
        with db.connect_dsn(pg_cluster.dsn("postgres", name), pg_cluster.passfile) as c:
            c.execute("CREATE TABLE the_old_one (x int)")  # tells the old database from a restored one
        with pytest.raises(OperationFailed, match="could not be swapped in, and nothing was renamed") as ei:
            drill.restore(settings, env, backup_id=m.id, target_dsn=target, force=True, progress=sit_in_staging)
        assert "being accessed by other users" in ei.value.message and blockers
        assert "lost the database connection" not in ei.value.message
        assert f"kept as {staging}" in ei.value.hint
        # the first rename was rolled back with the second: the old database still has its name
        assert _databases(pg_super, name) == [name] and _has_table(pg_cluster, name, "the_old_one")
        assert staging in scratch_dbs(pg_super)  # verified, so never dropped
        for b in blockers:
            b.close()
        said = []
        out = drill.restore(settings, env, backup_id=m.id, target_dsn=target, force=True, progress=said.append)
        assert out["result"] == "restored" and any("kept verified by an earlier run" in s for s in said), said
        assert not any(s.startswith("downloaded") for s in said)  # the kept copy was swapped in as it was
        assert not _has_table(pg_cluster, name, "the_old_one") and _has_table(pg_cluster, out["replaced"], "the_old_one")
        with db.connect_dsn(pg_cluster.dsn("postgres", name), pg_cluster.passfile) as c:
            assert table_rows(c, "events") == table_rows(pg_super, "events")
            assert c.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database"
                             " WHERE datname = current_database()").fetchone()[0] is None
        assert scratch_dbs(pg_super) == []
    finally:
        for b in blockers:
            b.close()
        for d in _databases(pg_super, name) + [d for d in scratch_dbs(pg_super) if d == staging]:
            pg_super.execute(f'DROP DATABASE IF EXISTS "{d}" WITH (FORCE)')


@pytest.fixture
def live(bk, pg_super, pg_cluster, tmp_path):
    """A platform database of its own (restored from a backup of the test database) and the `dn`
    command configured with it as its platform database."""
    from tests.fixtures.postgres import to_toml

    settings, env = bk
    generate(pg_super, tenants=2, events=40)
    m = run.run_backup(settings, env)
    name = f"dn_live_{os.getpid()}"
    pg_super.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    drill.restore(settings, env, backup_id=m.id, target_dsn=pg_cluster.dsn("dn_owner", name))
    data = json.loads(settings.model_dump_json(exclude={"source"}))
    data["database"].update(dsn=pg_cluster.dsn("dn", name), admin_dsn=pg_cluster.dsn("dn_owner", name))
    cfg = tmp_path / "dn-live.toml"
    cfg.write_text(to_toml(data) + "\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith("DN_") and k not in ("CI", "GITHUB_ACTIONS")}
    base.update({"DN_CONFIG": str(cfg), "DN_HOME": str(settings.data_dir), "DN_PASSPHRASE": PASSPHRASE})
    dn_bin = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "dn")

    def dn(*argv):
        return subprocess.run([dn_bin, *argv], capture_output=True, text=True, env=base, stdin=subprocess.DEVNULL,
                              timeout=300)

    yield dn, m, name
    for (d,) in pg_super.execute("SELECT datname FROM pg_database WHERE datname LIKE %s OR datname LIKE 'dn\\_restore\\_%%'",
                                 (name.replace("_", "\\_") + "%",)).fetchall():
        pg_super.execute(f'DROP DATABASE IF EXISTS "{d}" WITH (FORCE)')


def test_force_onto_the_live_platform_database(live, pg_super, pg_cluster):
    """`dn dr restore --force` onto the platform database dn itself runs on: refused (nothing
    renamed, audited as failed) while another client is connected; done when only dn is, with
    the entry audited into the restored database."""
    from dn import db

    dn, m, name = live
    target = pg_cluster.dsn("dn_owner", name)
    other = db.connect_dsn(pg_cluster.dsn("postgres", name), pg_cluster.passfile, application_name="someone else")
    try:
        r = dn("dr", "restore", "--backup", m.id, "--target", target, "--force", "--yes")
        assert r.returncode == ExitCode.FAILED, r.stderr
        assert f"database {name} has 1 open connection(s) (someone else)" in r.stderr, r.stderr
        assert _databases(pg_super, name) == [name]
        assert other.execute("SELECT command, outcome FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone() == \
            ("dr restore", "failed")
    finally:
        other.close()
    r = dn("dr", "restore", "--backup", m.id, "--target", target, "--force", "--yes")
    assert r.returncode == 0, r.stderr
    (replaced,) = [d for d in _databases(pg_super, name) if d != name]
    assert f"the previous database is kept as {replaced}" in r.stdout
    with db.connect_dsn(pg_cluster.dsn("postgres", name), pg_cluster.passfile) as c:
        assert c.execute("SELECT command, outcome FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone() == \
            ("dr restore", "ok")
        assert table_rows(c, "events") == table_rows(pg_super, "events")
    assert scratch_dbs(pg_super) == []
