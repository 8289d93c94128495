"""`dn gdpr delete` end to end through the `dn` command on a tenant made by `dn tenant create`
with the real Pulumi engine on the sandbox EU host (dn's own docker backend): its containers,
network, vhost, firewall chains, LUKS volume and backup timer exist; a real backup of it exists;
after the deletion none of them does, the LUKS header was erased (luksDump: no keyslot) before
the file went, the backup can no longer be decrypted, and the database holds nothing personal
of the tenant except its invoices."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tests.integration.test_gdpr_setup import add_data, billing_marker, fernet_key, markers, scan, wipe_gdpr
from dn.sandbox import issue_certificate as sandbox_cert
from tests.fixtures.sandbox import host_lock, remove_backup_dir
from tests.stacks import e2e

pytestmark = [pytest.mark.engine, pytest.mark.sandbox, pytest.mark.postgres,
              pytest.mark.skipif(e2e.engine_missing() is not None, reason=e2e.engine_missing() or "")]

SLUG = "gdpr-e2e"
DOMAIN = "gtm.gdpr-e2e.example"
CONFIG = "Z2Rwci1lMmUtY29udGFpbmVyLWNvbmZpZy12YWx1ZQ=="



@pytest.fixture
def env(sandbox, dn_settings_data, tmp_path, pg_super):
    from dn.models import HostBaseline

    e2e.ensure_host_dn()
    wipe_gdpr(pg_super)
    path = f"/backups/test-gdpr-e2e-{uuid.uuid4().hex[:10]}"
    backup = {**sandbox.settings.backup.model_dump(mode="json", exclude_none=True), "path": path, "retries": 1}
    with host_lock():
        env = e2e.make_env(sandbox, dn_settings_data, tmp_path, backup=backup)
        env.env["DN_FERNET_KEYS"] = fernet_key()
        host = HostBaseline.from_settings(env.settings)
        files = list(sandbox_cert(host.prefix, host.cert_dir, [DOMAIN], days=1))
        code, _, err = env.dn_json("host", "up")
        assert code == 0, err
        try:
            yield env, host
        finally:
            if (Path(env.settings.data_dir) / "stacks" / SLUG).exists():
                env.dn("tenant", "destroy", SLUG, "--yes")
            for f in files:
                f.unlink(missing_ok=True)
            remove_backup_dir(env.settings.backup, path)
            wipe_gdpr(pg_super)


def test_a_tenant_made_by_dn_is_erased_from_host_backups_and_database(env, sandbox):
    from dn import db
    from dn.backup import crypto, drill, keys, run
    from dn.models import TenantSpec

    env, host = env
    r = env.dn("tenant", "create", SLUG, "--domain", DOMAIN, "--name", "GDPR E2E s.r.o.", "--container-config-stdin",
               input=CONFIG)
    assert r.returncode == 0, r.stderr
    spec = TenantSpec.model_construct(slug=SLUG)
    image = host.path(spec.volume_image)
    vhost = Path(host.path(f"/etc/nginx/dn/vhosts/{SLUG}.conf"))
    timer = Path(host.path(f"/etc/systemd/system/{spec.backup_unit}.timer"))
    assert sandbox.ns_exec(["cryptsetup", "isLuks", image], check=False).returncode == 0
    assert vhost.is_file() and timer.is_file()
    assert sandbox.docker(["network", "inspect", spec.network], check=False).returncode == 0

    with db.connect(env.settings.database) as conn:
        tid = conn.execute("SELECT id FROM tenants WHERE slug = %s", (SLUG,)).fetchone()[0]
        add_data(conn, tid, SLUG, env.env, events=200, hours=24, invoices=2)
    r = env.dn("backup", "run", "--tenant", SLUG)
    assert r.returncode == 0, r.stderr
    backup_id = r.stdout.strip()

    code, req, err = env.dn_json("gdpr", "request", SLUG)
    assert code == 0, err
    rid = req["request_id"]
    r = env.dn("gdpr", "delete", SLUG, "--request-id", str(rid), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert f"docker network: {spec.network}" in r.stdout and "crypto-erase" in r.stdout and "events" in r.stdout

    code, out, err = env.dn_json("gdpr", "delete", SLUG, "--request-id", str(rid), "--yes")
    assert code == 0, err
    cert = out["certificate"]
    steps = {s["step"]: s["result"] for s in cert["steps"]}
    # the volume: erased (luksDump after the erase lists no keyslot), then removed
    assert steps["luks"]["present"] and steps["luks"]["keyslots_before"] == {image: [0]}
    assert steps["luks"]["after_erase"][image]["keyslots"] == [] and steps["luks"]["files_after"] == []
    assert "Keyslots:" in steps["luks"]["after_erase"][image]["luks_dump"]
    # the stack: destroyed through dn.tenants, and the probe finds nothing of it
    assert steps["stack"]["stack_existed"] and steps["stack"]["probe"]["present"] == []
    # the backup: its key destroyed
    assert [b["id"] for b in steps["backup-keys"]["tenant_backups"]] == [backup_id]
    # ... in every keystore dn puts keys in, each checked: this machine's, the host's (the data dir
    # its timers back up with) and the region's escrow
    checked = {c["keystore"]: c for c in steps["backup-keys"]["checked"]}
    assert set(checked) == {"operator", f"host {host.name}", f"escrow {env.settings.backup.region}"}
    assert all(r == {"key_files": [], "tombstone": True} for c in checked.values() for r in c["owners"].values())

    assert not Path(image).exists() and not vhost.exists() and not timer.exists()
    assert sandbox.docker(["network", "inspect", spec.network], check=False).returncode != 0
    for c in (spec.tagging_container, spec.preview_container):
        assert sandbox.docker(["container", "inspect", c], check=False).returncode != 0
    v4 = sandbox.ns_exec(["iptables-save"]).stdout.decode()
    assert spec.chain_forward not in v4 and spec.chain_input not in v4
    with run.open_store(env.settings) as store:
        m = store.manifest(backup_id)
        with pytest.raises(crypto.MissingKey, match="crypto-shredded"):
            drill.key_lookup(keys.keystore(env.settings, env.env), store, m)
    with db.connect(env.settings.database) as conn:
        for mk in markers(SLUG):
            assert scan(conn, mk) == {}, mk
        assert scan(conn, billing_marker(SLUG)) == {"invoices": 2}
        # the display name never reached the audit log (redacted as personal data); the domain
        # given to `dn tenant create` survives only in that command's entry: the append-only log
        # keeps it until the anchored prune (retention.audit_days)
        assert scan(conn, "GDPR E2E s.r.o.") == {}
        assert scan(conn, DOMAIN) == {"audit_log": 1}
        assert conn.execute("SELECT command FROM audit_log WHERE args::text LIKE %s",
                            (f"%{DOMAIN}%",)).fetchall() == [("tenant create",)]
        assert conn.execute("SELECT status FROM tenants WHERE id = %s", (tid,)).fetchone() == ("deleted",)
    code, listed, _ = env.dn_json("tenant", "list")
    assert code == 0 and SLUG not in [t["slug"] for t in listed]
    assert CONFIG not in json.dumps(out)
