"""`dn verify`'s backup.fresh against a real backup in the sandbox's second region: it judges
the newest platform backup the way a restore drill does.

- a manifest edited after the backup (one row count) FAILs, as the drill refuses it;
- a newest backup whose manifest is cut short FAILs (it is not passed over for the one before);
- a data key this machine cannot have (no passphrase; no key here nor in the escrow) is
  UNKNOWN, never PASS.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from dn.backup import drill, run
from dn.backup.manifest import MANIFEST_NAME
from dn.errors import ExitCode
from dn.verify import core
from dn.verify.claims import CLAIMS
from dn.verify.probe import Probe
from tests.fixtures.postgres import to_toml
from tests.integration.test_backup import PASSPHRASE, bk, cheap_scrypt, generate  # noqa: F401

pytestmark = [pytest.mark.postgres, pytest.mark.sandbox]
DN = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "dn")


def fresh(settings, env) -> core.Result:
    with Probe(settings, environ=env) as probe:
        (r,) = core.run_checks(list(CLAIMS), probe, ["backup.fresh"])
    return r


def text(r: core.Result) -> str:
    return "\n".join(r.evidence + ([r.reason] if r.reason else []))


def manifest_path(store, backup_id: str) -> str:
    return f"{store.root}/{backup_id}/{MANIFEST_NAME}"


def test_untouched_backup_passes_with_its_mac_verified(bk, pg_super):
    settings, env = bk
    generate(pg_super, tenants=1, events=20)
    m = run.run_backup(settings, env)
    r = fresh(settings, env)
    assert r.status is core.Status.PASS, text(r)
    assert f"newest platform backup {m.id}" in text(r) and "manifest MAC verifies" in text(r)


def test_edited_row_count_fails_fresh_as_it_fails_the_drill(bk, pg_super, tmp_path):
    settings, env = bk
    generate(pg_super, tenants=2, events=30)
    m = run.run_backup(settings, env)
    with run.open_store(settings) as store:
        doc = json.loads(store.sftp.open(manifest_path(store, m.id)).read())
        doc["tables"]["public.events"] += 1  # one row count, nothing else
        with store.sftp.open(manifest_path(store, m.id), "wb") as f:
            f.write(json.dumps(doc).encode())
    r = fresh(settings, env)
    assert r.status is core.Status.FAIL, text(r)
    assert f"{m.id}: the manifest does not authenticate" in text(r)
    report = drill.run_drill(settings, env, notify=False)
    assert report["result"] == "failed" and any("does not authenticate" in f for f in report["failures"])
    # the command says the same: exit 4
    cfg = tmp_path / "dn.toml"
    cfg.write_text(to_toml(json.loads(settings.model_dump_json(exclude={"source"}))) + "\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith("DN_") and k not in ("CI", "GITHUB_ACTIONS")}
    base.update({"DN_CONFIG": str(cfg), "DN_HOME": str(settings.data_dir), "DN_PASSPHRASE": PASSPHRASE})
    p = subprocess.run([DN, "verify", "--check", "backup.fresh", "--json"], capture_output=True, text=True,
                       env=base, stdin=subprocess.DEVNULL, timeout=300)
    assert p.returncode == ExitCode.POLICY, p.stderr
    (res,) = json.loads(p.stdout)["results"]
    assert res["id"] == "backup.fresh" and res["status"] == "FAIL"


def test_truncated_newest_manifest_fails_fresh(bk, pg_super):
    settings, env = bk
    generate(pg_super, tenants=1, events=20)
    older = run.run_backup(settings, env)
    # Backup ids order by their second (then a random suffix): the newest must start a later one.
    time.sleep(1.05 - time.time() % 1)
    newest = run.run_backup(settings, env)
    assert newest.id > older.id
    with run.open_store(settings) as store:
        size = store.sftp.stat(manifest_path(store, newest.id)).st_size
        store.sftp.truncate(manifest_path(store, newest.id), size // 2)
    r = fresh(settings, env)
    assert r.status is core.Status.FAIL, text(r)
    assert r.evidence[0].startswith(f"the newest backup {newest.id} is damaged"), text(r)
    assert "its manifest cannot be read" in r.evidence[0]


def test_key_that_cannot_be_had_is_unknown_never_pass(bk, pg_super):
    settings, env = bk
    generate(pg_super, tenants=1, events=20)
    m = run.run_backup(settings, env)
    # another machine: no keystore of its own, and no passphrase to unlock the escrow copy
    other = settings.model_copy(update={"data_dir": Path(settings.data_dir) / "other-machine"})
    Path(other.data_dir).mkdir()
    r = fresh(other, {})
    assert r.status is core.Status.UNKNOWN, text(r)
    assert f"manifest MAC of {m.id} not checked, its data key cannot be had here" in r.reason and "passphrase" in r.reason, r.reason
    assert "SHA-256 matches the manifest" in text(r)  # what it could check, it did
    # the key removed from this machine and from the region's escrow
    (Path(settings.data_dir) / "backup-keys" / "platform.json").unlink()
    with run.open_store(settings) as store:
        store.sftp.remove(f"{store.root}/keys/platform.json")
    r = fresh(settings, env)
    assert r.status is core.Status.UNKNOWN, text(r)
    assert "neither in the keystore nor in the backup region's escrow" in r.reason, r.reason


def test_damaged_older_backup_is_evidence_not_a_failure_of_freshness(bk, pg_super):
    settings, env = bk
    generate(pg_super, tenants=1, events=20)
    older = run.run_backup(settings, env)
    time.sleep(1.05 - time.time() % 1)  # a later second: ids order by it
    newest = run.run_backup(settings, env)
    with run.open_store(settings) as store:
        size = store.sftp.stat(manifest_path(store, older.id)).st_size
        store.sftp.truncate(manifest_path(store, older.id), size // 2)
    r = fresh(settings, env)
    assert r.status is core.Status.PASS, text(r)
    assert f"newest platform backup {newest.id}" in text(r)
    assert f"backup {older.id}: its manifest cannot be read" in text(r)
