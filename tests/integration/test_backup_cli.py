"""`dn backup` and `dn dr` as an operator and a scheduler run them: exit codes, JSON, audit."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from dn.errors import ExitCode
from tests.fixtures.postgres import to_toml
from tests.fixtures.sandbox import remove_backup_dir
from tests.integration.test_backup import PASSPHRASE, bk, cheap_scrypt, generate  # noqa: F401

pytestmark = [pytest.mark.postgres, pytest.mark.sandbox]
DN = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "dn")


@pytest.fixture
def cli(bk, tmp_path):
    settings, env = bk
    data = json.loads(settings.model_dump_json(exclude={"source"}))
    cfg = tmp_path / "dn.toml"
    cfg.write_text(to_toml(data) + "\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith("DN_") and k not in ("CI", "GITHUB_ACTIONS")}
    base.update({"DN_CONFIG": str(cfg), "DN_HOME": str(settings.data_dir), "DN_PASSPHRASE": PASSPHRASE})

    def dn(*argv, env=None):
        return subprocess.run([DN, *argv], capture_output=True, text=True, env={**base, **(env or {})},
                              stdin=subprocess.DEVNULL, timeout=300)

    return dn, settings


def test_backup_drill_status_through_the_cli(cli, pg_super):
    dn, settings = cli
    generate(pg_super, tenants=2, events=50)
    r = dn("backup", "run")
    assert r.returncode == 0, r.stderr
    backup_id = r.stdout.strip()
    assert "committed" in r.stderr and PASSPHRASE not in r.stderr + r.stdout
    r = dn("backup", "list", "--json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["id"] == backup_id and row["tier"] in ("daily", "monthly") and row["verified"] is False
    r = dn("dr", "drill", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["result"] == "passed" and report["backup"]["id"] == backup_id
    r = dn("backup", "list")
    assert r.returncode == 0 and backup_id in r.stdout and r.stdout.splitlines()[1].endswith("yes")
    r = dn("dr", "status", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["alarms"] == [] and st["last_drill"]["result"] == "passed" and st["last_backup"]["id"] == backup_id
    r = dn("dr", "status")
    assert r.returncode == 0, r.stderr
    assert f"last backup     {backup_id}" in r.stdout and "PASSED" in r.stdout and "next drill" in r.stdout
    assert "all DR promises hold" in r.stderr
    r = dn("dr", "drill", "--max-rpo-hours", "0")
    assert r.returncode == ExitCode.POLICY and "RPO" in r.stderr
    r = dn("backup", "prune", "--dry-run", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"dry_run": True, "remove": []}
    commands = [c for (c,) in pg_super.execute("SELECT command FROM audit_log ORDER BY seq").fetchall()]
    assert commands == ["backup run", "dr drill", "dr drill"]
    outcomes = [o for (o,) in pg_super.execute("SELECT outcome FROM audit_log ORDER BY seq").fetchall()]
    assert outcomes == ["ok", "ok", "failed"]


def test_restore_refuses_non_empty_target_and_needs_confirmation(cli, pg_super, pg_cluster, pg_database):
    dn, settings = cli
    generate(pg_super, tenants=1, events=10)
    backup_id = dn("backup", "run").stdout.strip()
    # the production database itself is not empty: refused without --force, exit 2
    r = dn("dr", "restore", "--backup", backup_id, "--target", settings.database.admin_dsn, "--yes")
    assert r.returncode == ExitCode.INVALID and "is not empty" in r.stderr and "--force" in r.stderr
    target = pg_cluster.dsn("dn_owner", f"dn_cli_restore_{os.getpid()}")
    try:
        r = dn("dr", "restore", "--backup", backup_id, "--target", target)  # no terminal, no --yes
        assert r.returncode == ExitCode.INVALID and "--yes" in r.stderr
        r = dn("dr", "restore", "--backup", backup_id, "--target", target, "--yes")
        assert r.returncode == 0, r.stderr
        assert pg_super.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                (f"dn_cli_restore_{os.getpid()}",)).fetchone()
        r = dn("dr", "restore", "--backup", "latest", "--target", target, "--yes")
        assert r.returncode == ExitCode.INVALID and "--backup: 'latest' is not a backup id" in r.stderr
    finally:
        pg_super.execute(f'DROP DATABASE IF EXISTS "dn_cli_restore_{os.getpid()}" WITH (FORCE)')
    last = pg_super.execute("SELECT command, outcome, args FROM audit_log WHERE command = 'dr restore' ORDER BY seq").fetchall()
    assert [(c, o) for c, o, _ in last] == [("dr restore", "failed"), ("dr restore", "failed"), ("dr restore", "ok"),
                                            ("dr restore", "failed")]


def test_unreachable_region_exits_3_and_lists_nothing(cli, pg_super):
    dn, settings = cli
    generate(pg_super, tenants=1, events=5)
    r = dn("backup", "run", env={"DN__BACKUP__PORT": "2222", "DN__BACKUP__RETRIES": "1"})
    assert r.returncode == ExitCode.UNREACHABLE, r.stderr
    assert "gave up after 2 attempts" in r.stderr and "runbook: dn runbook show disaster-recovery" in r.stderr
    r = dn("backup", "list", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == []


def test_restore_after_losing_the_platform_database_is_audited_in_the_restored_one(cli, pg_super, pg_cluster):
    dn, settings = cli
    generate(pg_super, tenants=1, events=10)
    backup_id = dn("backup", "run").stdout.strip()
    name = f"dn_after_disaster_{os.getpid()}"
    target = pg_cluster.dsn("dn_owner", name)
    # the configured platform database is gone (nothing listens there any more)
    gone = {"DN__DATABASE__DSN": "postgresql://dn@127.0.0.1:1/dn", "DN__DATABASE__ADMIN_DSN": "postgresql://dn_owner@127.0.0.1:1/dn"}
    try:
        r = dn("dr", "restore", "--backup", backup_id, "--target", target, "--yes", env=gone)
        assert r.returncode == 0, r.stderr
        assert "audited in the restored database" in r.stderr
        from dn import db

        with db.connect_dsn(pg_cluster.dsn("postgres", name), pg_cluster.passfile) as c:
            rows = c.execute("SELECT command, outcome FROM audit_log ORDER BY seq").fetchall()
            src = pg_super.execute("SELECT command, outcome FROM audit_log ORDER BY seq").fetchall()
            # the backup's snapshot predates its own "backup run" entry (written when the run
            # ended): the restored chain is the snapshot's (empty) plus the restore's entry
            assert src == [("backup run", "ok")]
            assert rows == [("dr restore", "ok")]
    finally:
        pg_super.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_offline_copy_of_the_monthly_copies(cli, pg_super, tmp_path):
    """`dn backup offline`: the newest month's monthly copies, as stored, checked artifact by
    artifact, with the wrapped keys beside them; recorded in the region; idempotent; a damaged
    artifact leaves nothing behind; bad input exits 2 having written nothing."""
    import hashlib

    from dn.backup import run
    from dn.backup.manifest import MANIFEST_NAME

    dn, settings = cli
    generate(pg_super, tenants=2, events=50)
    platform = dn("backup", "run").stdout.strip()
    tenant = dn("backup", "run", "--tenant", "shop-0001").stdout.strip()
    disk = tmp_path / "offline-disk"

    r = dn("backup", "offline", "--to", str(disk))  # not mounted (no such directory)
    assert r.returncode == ExitCode.INVALID and "--to" in r.stderr and not disk.exists()
    disk.mkdir()
    r = dn("backup", "offline", "--to", str(disk), "--backup", "../../etc")
    assert r.returncode == ExitCode.INVALID and "--backup" in r.stderr and list(disk.iterdir()) == []
    assert pg_super.execute("SELECT count(*) FROM audit_log WHERE command = 'backup offline'").fetchone() == (0,)
    r = dn("backup", "offline", "--to", str(disk), "--backup", platform[:-1] + ("0" if platform[-1] != "0" else "1"))
    assert r.returncode == ExitCode.INVALID and "no backup" in r.stderr and list(disk.iterdir()) == []

    r = dn("backup", "offline", "--to", str(disk), "--json")
    assert r.returncode == 0, r.stderr
    done = json.loads(r.stdout)
    assert sorted(d["backup"] for d in done) == sorted([platform, tenant])
    assert {d["result"] for d in done} == {"copied"}
    with run.open_store(settings) as store:
        for d in done:
            copy = disk / d["backup"]
            m = store.manifest(d["backup"])
            assert (copy / "manifest.json").read_bytes() == store.sftp.open(
                f"{store.root}/{d['backup']}/{MANIFEST_NAME}").read()
            for a in m.artifacts:
                assert hashlib.sha256((copy / a.name).read_bytes()).hexdigest() == a.sha256
            owner_key = disk / "keys" / f"{m.key.owner}.json"
            if m.kind == "platform":
                assert owner_key.read_bytes() == store.get_key(m.key.owner)
            else:  # a tenant's key stays where GDPR deletion can shred it
                assert not owner_key.exists()
            assert (copy / a.name).stat().st_mode & 0o077 == 0  # ciphertext, still private
        listed = {lst.id: lst for lst in store.list()}
    assert listed[platform].offline["to"] == str(disk / platform)
    r = dn("backup", "list", "--json")
    rows = {row["id"]: row for row in json.loads(r.stdout)}
    assert rows[tenant]["offline"]["manifest_sha256"] == done[0 if done[0]["backup"] == tenant else 1]["manifest_sha256"]

    # a copy whose record never reached the region (cut short): the rerun records it
    with run.open_store(settings) as store:
        store.sftp.remove(f"{store.root}/{platform}/offline.json")
    again = dn("backup", "offline", "--to", str(disk), "--json")
    assert again.returncode == 0 and {d["result"] for d in json.loads(again.stdout)} == {"already there"}
    with run.open_store(settings) as store:
        assert {lst.id: lst for lst in store.list()}[platform].offline["to"] == str(disk / platform)

    # a damaged artifact in the region: refused, and no partial copy is left on the disk
    other = tmp_path / "second-disk"
    other.mkdir()
    with run.open_store(settings) as store:
        name = store.manifest(platform).artifacts[0].name
        path = f"{store.root}/{platform}/{name}"
        data = bytearray(store.sftp.open(path).read())
        data[len(data) // 2] ^= 0x01
        with store.sftp.open(path, "wb") as f:
            f.write(bytes(data))
    r = dn("backup", "offline", "--to", str(other), "--backup", platform)
    assert r.returncode == ExitCode.FAILED and f"artifact {name}" in r.stderr
    assert list(other.iterdir()) == []
    outcomes = pg_super.execute("SELECT outcome, exit_code FROM audit_log WHERE command = 'backup offline' "
                                "ORDER BY seq").fetchall()
    # no such backup (asked the region), copied, already there, damaged; bad input before: none
    assert outcomes == [("failed", 2), ("ok", 0), ("ok", 0), ("failed", 1)], outcomes


def test_a_drill_restores_from_the_offline_copy(cli, pg_super, sandbox):
    """The disk has the region's layout: served as the backup target (here: a directory in the
    sandbox's second region), the platform copy on it restores and passes a drill."""
    from dn import sandbox as sb

    dn, settings = cli
    generate(pg_super, tenants=2, events=50)
    backup_id = dn("backup", "run").stdout.strip()
    disk_path = settings.backup.path + "-offline-disk"
    disk = Path(str(sb.EU2_CHROOT) + disk_path)
    disk.mkdir(mode=0o700)
    try:
        r = dn("backup", "offline", "--to", str(disk), "--backup", backup_id)
        assert r.returncode == 0, r.stderr
        assert sorted(p.name for p in disk.iterdir()) == sorted([backup_id, "keys"])
        import shutil as sh

        # the region is gone; the disk is all there is
        remove_backup_dir(settings.backup, settings.backup.path)
        (disk / backup_id / "offline.json").unlink(missing_ok=True)
        for p in disk.rglob("*"):  # the region's SFTP user reads the disk
            sh.chown(p, user=sb.BACKUP_USER)
        sh.chown(disk, user=sb.BACKUP_USER)
        cfg_env = {"DN__BACKUP__PATH": disk_path}
        r = dn("dr", "drill", "--json", env=cfg_env)
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["result"] == "passed" and report["backup"]["id"] == backup_id
    finally:
        remove_backup_dir(settings.backup, disk_path)
