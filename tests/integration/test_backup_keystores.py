"""Backup keys across every keystore dn puts them in, against the real platform database, the
sandbox EU host (over SSH) and the sandbox's second region (SFTP):

- the escrow is created once and never replaced: backups made by the operator and by the host's
  timer (two installations, two data dirs) all restore with the passphrase alone after both data
  dirs are lost, including one made under a key an older dn never escrowed;
- a GDPR deletion shreds the tenant's key in the host's keystore too, leaves a tombstone there
  and in the region, certifies what it checked where, and no backup of the tenant starts after;
- `dn backup run --tenant` holds the tenant's lock;
- a slug reused after `dn tenant destroy` gets a new key and a new backup series; the old
  tenant's backups are unreadable.

The EU host's own dn installation is simulated on this machine: the sandbox host is a network
namespace sharing this machine's filesystem, so "the host's dn" here is dn run with the host's
data dir (``hosts.<name>.dn_data_dir`` under the host's prefix), exactly the keystore that dn
reaches over SSH on a real host.
"""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from dn.backup import crypto, drill, keys, run
from dn.errors import ExitCode, InvalidInput
from tests.integration.test_gdpr_setup import HOST, add_request, add_tenant, gdpr_env  # noqa: F401 (fixture)

pytestmark = [pytest.mark.postgres, pytest.mark.sandbox]
DN = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "dn")


@pytest.fixture(autouse=True)
def cheap_scrypt(monkeypatch):
    monkeypatch.setattr(keys, "SCRYPT_N", 1 << 12)


@pytest.fixture
def world(gdpr_env, tmp_path):
    """The operator's settings (its own data dir) and the host's dn (the data dir its timers use)."""
    from dn.config import Settings
    from dn.context import Context

    data = copy.deepcopy(gdpr_env.data)
    data["hosts"][HOST]["dn_data_dir"] = f"/var/lib/dn-test-{uuid.uuid4().hex[:10]}"
    op = Settings.model_validate({**data, "source": "operator"})
    h = op.host(HOST)
    host_dir = Path(h.path(h.dn_data_dir))
    host_dir.mkdir(parents=True, mode=0o700)
    host = Settings.model_validate({**data, "data_dir": str(host_dir), "source": "the host's dn"})
    ctx = Context(environ=gdpr_env.environ, _settings=op)
    try:
        yield SimpleNamespace(op=op, host=host, ctx=ctx, environ=gdpr_env.environ, env=gdpr_env, host_dir=host_dir,
                              tmp=tmp_path, data=data)
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


def settings_in(w, data_dir: Path):
    from dn.config import Settings

    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return Settings.model_validate({**w.data, "data_dir": str(data_dir), "source": "a fresh installation"})


def restore(settings, environ, backup_id: str, workdir: Path) -> list:
    """Fetch, authenticate and decrypt every artifact of a backup with this installation's keys."""
    workdir.mkdir(parents=True, exist_ok=True)
    with run.open_store(settings) as store:
        m = store.manifest(backup_id)
        ks = keys.keystore(settings, environ)
        return drill.fetch(store, m, drill.key_lookup(ks, store, m), workdir)


# -- item 4: one key per owner, escrowed before first use, never replaced ------------------------
def test_the_escrow_is_created_once_and_never_replaced(world):
    a, b = keys.keystore(world.op, world.environ), keys.keystore(world.host, world.environ)
    first, second = a.fresh("platform"), b.fresh("platform")
    with run.open_store(world.op) as store:
        assert store.create_key("platform", first) is True
        assert store.create_key("platform", second) is False  # the SFTP rename never replaces
        assert store.get_key("platform") == first
        assert store.key_files("platform") == [f"{store.root}/keys/platform.json"]  # no upload left behind


def test_backups_of_two_installations_restore_with_the_passphrase_alone(world):
    w = world
    with w.env.connect() as conn:
        tid = add_tenant(conn, "two-homes", w.environ, events=30, hours=4, invoices=1)
    made = [run.run_backup(w.op, w.environ)]  # the operator's first backup escrows the platform key
    # an older dn on the host made its own platform key and a slug-named tenant key, never
    # escrowed (the operator's run replaced the escrow file), and backed up with them
    hks = keys.keystore(w.host, w.environ)
    legacy = hks.create("platform")
    legacy_tenant = hks.create(keys.legacy_owner("two-homes"))
    with run.open_store(w.host) as store:
        made.append(run._backup_once(w.host, store, legacy, None, None, lambda s: None, lambda n: None))
        made.append(run._backup_once(w.host, store, legacy_tenant, "two-homes", tid, lambda s: None, lambda n: None))
    # the host's timer now: tenant and platform backups; then the operator's tenant backup
    made.append(run.run_backup(w.host, w.environ, tenant="two-homes"))
    made.append(run.run_backup(w.host, w.environ))
    made.append(run.run_backup(w.op, w.environ, tenant="two-homes"))
    platform_ids = {m.key.id for m in made if m.kind == "platform"}
    assert platform_ids == {made[0].key.id, legacy.id.hex()}  # the host switched to the escrowed key
    assert made[3].key == made[5].key != made[2].key  # one tenant key, whoever made it first; not the slug's
    # both installations lose their data dirs
    shutil.rmtree(Path(w.op.data_dir) / "backup-keys")
    shutil.rmtree(w.host_dir / "backup-keys")
    fresh = settings_in(w, w.tmp / "third")
    for i, m in enumerate(made):
        assert restore(fresh, w.environ, m.id, w.tmp / f"restore-{i}"), m.id
    with run.open_store(w.op) as store:
        assert store.key_files(keys.PLATFORM) == [f"{store.root}/keys/platform.json",
                                                  f"{store.root}/keys/platform/{legacy.id.hex()}.json"]


# -- item 3: GDPR deletion reaches the host's keystore ---------------------------------------------
def test_gdpr_delete_shreds_the_hosts_key_and_no_backup_starts_after(world):
    from dn.gdpr import workflow
    from dn.verify.core import Status
    from dn.verify.probe import Probe
    from dn.verify.shredding import check_keys_shredded

    w = world
    with w.env.connect() as conn:
        tid = add_tenant(conn, "gone-host", w.environ, events=20, hours=2, invoices=1)
        rid = add_request(conn, tid)
    by_host = run.run_backup(w.host, w.environ, tenant="gone-host")  # the host's timer
    by_op = run.run_backup(w.op, w.environ, tenant="gone-host")
    owner = by_host.key.owner
    hk = keys.keystore(w.host, w.environ)
    assert by_op.key == by_host.key and hk.key_files(owner)

    out = workflow.delete(w.ctx, "gone-host", rid)

    # the host's key file is gone: with the passphrase, nothing of the tenant decrypts there
    assert hk.key_files(owner) == [] and hk.is_destroyed(owner)
    for m in (by_host, by_op):
        for who in (w.host, w.op, settings_in(w, w.tmp / f"fresh-{m.id}")):
            with pytest.raises(crypto.MissingKey, match="crypto-shredded"):
                restore(who, w.environ, m.id, w.tmp / "nothing")
    # the certificate states what was checked where
    checked = {c["keystore"]: c for c in out.certificate["backups"]["checked"]}
    assert set(checked) == {"operator", f"host {HOST}", f"escrow {w.op.backup.region}"}
    assert checked[f"host {HOST}"]["where"] == f"{HOST}:{w.host_dir}/backup-keys"
    for c in checked.values():
        assert c["owners"][owner] == {"key_files": [], "tombstone": True}, c
    # no backup of the tenant can be started: the registry says deleted ...
    with pytest.raises(InvalidInput, match="deleted"):
        run.run_backup(w.host, w.environ, tenant="gone-host")
    # ... and were it restored to an older state, the tombstones refuse, here and in the region,
    # and nothing brings the key back into the escrow
    with run.open_store(w.host) as store:
        for ks in (hk, keys.keystore(settings_in(w, w.tmp / "blank"), w.environ)):
            with pytest.raises(keys.KeystoreError, match="crypto-shredded"):
                run.obtain_key(store, ks, owner)
        assert store.key_files(owner) == [] and store.key_destroyed(owner)

    # dn verify: passes now, fails once a key file of the deleted tenant turns up on the host
    with Probe(w.op, HOST, environ=w.environ) as probe:
        status, evidence = check_keys_shredded(probe)
    assert status == Status.PASS, evidence
    (w.host_dir / "backup-keys" / f"{owner}.json").write_bytes(b"{}")
    with Probe(w.op, HOST, environ=w.environ) as probe:
        status, evidence = check_keys_shredded(probe)
    assert status == Status.FAIL and any(f"host {HOST}" in e and owner in e for e in evidence), evidence


def test_a_tenant_backup_holds_the_tenants_lock(world):
    from dn import db, locks
    from tests.fixtures.postgres import to_toml

    w = world
    with w.env.connect() as conn:
        add_tenant(conn, "locked-out", w.environ, events=5, hours=1, invoices=1)
    cfg = w.tmp / "dn.toml"
    cfg.write_text(to_toml(json.loads(w.host.model_dump_json(exclude={"source"}))) + "\n")
    env = {**w.environ, "DN_CONFIG": str(cfg), "DN_HOME": str(w.host_dir)}
    with db.connect(w.op.database) as conn:
        claimant = locks.Claimant.this_process("user:gdpr-deletion", "gdpr delete", "req-held-by-test")
        locks.acquire(conn, [locks.resource("tenant", "locked-out")], claimant, 1.0)
        try:
            r = subprocess.run([DN, "backup", "run", "--tenant", "locked-out"], env=env, capture_output=True,
                               text=True, timeout=300, stdin=subprocess.DEVNULL)
        finally:
            locks.release(conn, [locks.resource("tenant", "locked-out")], "req-held-by-test")
    assert r.returncode == ExitCode.LOCKED, r.stderr
    assert "gdpr delete" in r.stderr or "user:gdpr-deletion" in r.stderr
    assert keys.keystore(w.host, w.environ).owners() == []  # nothing was started
    r = subprocess.run([DN, "backup", "run", "--tenant", "locked-out"], env=env, capture_output=True, text=True,
                       timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr


# -- item 9: a reused slug is a new identity ----------------------------------------------------------
def _bare_tenant(w, slug: str, subnet: str) -> int:
    """A registered tenant with a spec and no other rows (so destroy removes its registry row)."""
    from dn import db, tenants
    from dn.models import parse_tenant

    spec = parse_tenant({"slug": slug, "domains": [f"{slug}.example"], "plan": "standard", "image": w.op.images.sgtm,
                         "preview": True, "backup_schedule": "*-*-* 03:00:00", "subnet": subnet,
                         "status": "active", "allow_wildcard": False}, plans=w.op.plans, host_view=True)
    with w.env.connect() as conn:
        tid = db.row(conn, "INSERT INTO tenants (slug, display_name, host) VALUES (%s, %s, %s) RETURNING id",
                     (slug, f"Display {slug}", HOST))["id"]
        tenants._write_spec(conn, tid, spec)
    return tid


def test_a_reused_slug_gets_a_new_key_and_series(world):
    from dn import tenants

    w = world
    _bare_tenant(w, "reused", "10.231.200.0/28")
    old = run.run_backup(w.op, w.environ, tenant="reused")
    by_host = run.run_backup(w.host, w.environ, tenant="reused")
    gone = tenants.destroy(w.ctx, "reused", confirm=lambda rec, resources: True)
    assert gone.registry == "deleted"
    _bare_tenant(w, "reused", "10.231.200.0/28")  # another customer, the same slug
    new = run.run_backup(w.host, w.environ, tenant="reused")
    assert new.key.owner != old.key.owner and new.key.id != old.key.id
    assert new.series != old.series
    restore(w.op, w.environ, new.id, w.tmp / "new")
    for m in (old, by_host):  # the old customer's backups: unreadable, not the new tenant's series
        for who in (w.op, w.host):
            with pytest.raises(crypto.MissingKey, match="crypto-shredded"):
                restore(who, w.environ, m.id, w.tmp / "old")
    with run.open_store(w.op) as store:
        rows = {r.listing.id: r.decision for r in run.plan(w.op, w.environ, store)}
    assert rows[old.id].tier == "shredded" and not rows[old.id].keep
    assert rows[new.id].series == new.key.owner != rows[old.id].series


def test_a_slug_named_series_of_older_dn_expires_once_the_tenants_own_series_exists(world):
    from datetime import datetime, timedelta, timezone

    w = world
    with w.env.connect() as conn:
        tid = add_tenant(conn, "old-series", w.environ, events=5, hours=1, invoices=1)
    old_key = keys.keystore(w.op, w.environ).create(keys.legacy_owner("old-series"))  # as older dn named it
    with run.open_store(w.op) as store:
        old = run._backup_once(w.op, store, old_key, "old-series", tid, lambda s: None, lambda n: None)
    later = datetime.now(timezone.utc) + timedelta(days=400)
    with run.open_store(w.op) as store:
        alone = {r.listing.id: r.decision for r in run.plan(w.op, w.environ, store, later)}
    assert alone[old.id].tier == "newest" and alone[old.id].keep  # the only backup of the tenant: kept
    new = run.run_backup(w.op, w.environ, tenant="old-series")
    with run.open_store(w.op) as store:
        rows = {r.listing.id: r.decision for r in run.plan(w.op, w.environ, store, later)}
    assert rows[new.id].tier == "newest" and rows[new.id].keep and rows[new.id].series == new.key.owner
    assert rows[old.id].tier == "expired" and not rows[old.id].keep and new.key.owner in rows[old.id].reason
