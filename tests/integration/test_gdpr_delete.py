"""`dn gdpr delete` against the real platform database, the sandbox EU host (SSH probes) and the
sandbox's backup region (real backups, real crypto-shredding)."""
from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dn.errors import InvalidInput, Locked, PolicyViolation
from dn.gdpr import certificate, workflow
from tests.integration.test_gdpr_setup import (
    add_request, add_tenant, billing_marker, gdpr_env, markers, scan, snapshot,  # noqa: F401 (fixture)
)

pytestmark = [pytest.mark.postgres, pytest.mark.sandbox]


def _three_tenants(env, **kw) -> dict[str, int]:
    with env.connect() as conn:
        return {s: add_tenant(conn, s, env.environ, **kw) for s in ("shop-alpha", "shop-beta", "shop-gamma")}


def test_dry_run_prints_the_plan_and_changes_nothing(gdpr_env):
    ids = _three_tenants(gdpr_env)
    with gdpr_env.connect() as conn:
        rid = add_request(conn, ids["shop-beta"], received_days_ago=3)
        before = snapshot(conn)
    out = workflow.delete(gdpr_env.ctx, "shop-beta", rid, dry_run=True)
    assert out.dry_run and out.certificate is None
    p = out.prepared.plan.to_dict()
    deleted = {d["table"]: d["rows"] for d in p["delete"]}
    assert deleted == {"api_keys": 2, "events": 300, "gtm_workspaces": 2, "hourly_stats": 48, "tenant_containers": 1,
                       "tenant_settings": 2, "users": 4}
    # users after api_keys: api_keys.created_by references users
    order = [d["table"] for d in p["delete"]]
    assert order.index("api_keys") < order.index("users")
    retained = {r["table"]: r for r in p["retain"]}
    assert retained["invoices"]["rows"] == 3 and "563/1991" in retained["invoices"]["reason"]
    assert retained["tenants"]["action"] == "minimise" and retained["tenants"]["minimise"] == {"display_name": "pseudonym"}
    assert p["days_left"] == 26 and p["deadline"].startswith(str(out.prepared.request.due_at.date()))
    kinds = {d["kind"] for d in p["destroy"]}
    assert kinds == {"docker container", "docker network", "nginx vhost", "firewall chain", "systemd unit"}
    assert {d["name"] for d in p["destroy"]} >= {"dn-t-shop-beta", "dn-shop-beta-tagging", "dn-shop-beta-preview"}
    assert p["crypto_erase"]["volume"].endswith("/var/lib/dn/volumes/shop-beta.luks")
    assert p["crypto_shred"]["owner"].startswith(f"tenant-shop-beta.{ids['shop-beta']}-")  # the tenant's identity
    with gdpr_env.connect() as conn:
        assert snapshot(conn) == before
        assert conn.execute("SELECT count(*) FROM gdpr_runs").fetchone()[0] == 0


def _fetch(settings, environ, backup_id: str, workdir: Path):
    from dn.backup import drill, keys, run

    with run.open_store(settings) as store:
        m = store.manifest(backup_id)
        ks = keys.keystore(settings, environ)
        return drill.fetch(store, m, drill.key_lookup(ks, store, m), workdir)


def test_delete_erases_the_tenant_and_certifies_it(gdpr_env, tmp_path, pg_super):
    from dn import audit
    from dn.backup import crypto, run

    env = gdpr_env
    ids = _three_tenants(env)
    target = ids["shop-beta"]
    # real backups: one of the tenant (its own key) and one of the platform
    tenant_backup = run.run_backup(env.settings, env.environ, tenant="shop-beta")
    platform_backup = run.run_backup(env.settings, env.environ)
    (tmp_path / "before").mkdir()
    assert _fetch(env.settings, env.environ, tenant_backup.id, tmp_path / "before")  # readable now
    with env.connect() as conn:
        rid = add_request(conn, target)
        others_before = snapshot(conn, exclude_tenant=target)
        invoices_before = conn.execute("SELECT * FROM invoices WHERE tenant_id = %s ORDER BY id", (target,)).fetchall()

    events = []
    out = workflow.delete(env.ctx, "shop-beta", rid, on_event=lambda s, p, d: events.append((s, p)))
    cert = out.certificate
    assert certificate.check(cert) == []
    assert [s["step"] for s in cert["steps"]] == ["disable", "luks", "stack", "backup-keys", "rows", "minimise"]
    assert ("certificate", "done") in events
    counts = cert["counts"]
    for table in ("users", "api_keys", "tenant_containers", "tenant_settings", "gtm_workspaces", "events", "hourly_stats"):
        assert counts[table]["action"] == "deleted" and counts[table]["after"] == 0 and counts[table]["before"] > 0, table
    assert counts["events"]["before"] == 300
    assert counts["invoices"] == {"before": 3, "after": 3, "action": "retained"}
    assert counts["tenants"] == {"before": 1, "after": 1, "action": "minimised"}
    assert cert["on_time"] and cert["request_id"] == rid

    with env.connect() as conn:
        # nothing personal of the tenant is left anywhere in the database ...
        for m in markers("shop-beta"):
            assert scan(conn, m) == {}, m
        # ... except the retained invoices, unchanged
        assert scan(conn, billing_marker("shop-beta")) == {"invoices": 3}
        assert conn.execute("SELECT * FROM invoices WHERE tenant_id = %s ORDER BY id", (target,)).fetchall() == invoices_before
        t = conn.execute("SELECT status, display_name, deleted_at IS NOT NULL FROM tenants WHERE id = %s", (target,)).fetchone()
        assert t == ("deleted", f"deleted-tenant-{target}", True)
        assert conn.execute("SELECT status, completed_at IS NOT NULL FROM deletion_requests WHERE id = %s",
                            (rid,)).fetchone() == ("done", True)
        # every other tenant untouched, row for row
        assert snapshot(conn, exclude_tenant=target) == others_before
        assert conn.execute("SELECT count(*) FROM op_locks").fetchone()[0] == 0

    # the host: nothing of the tenant (probed over SSH), the LUKS step found no volume
    assert cert["stack"]["probe"]["present"] == [] and len(cert["stack"]["probe"]["checks"]) >= 9
    assert cert["luks"]["present"] is False
    # the backups: the tenant's can no longer be decrypted, anywhere; the platform's expire
    b = cert["backups"]
    assert [x["id"] for x in b["tenant_backups"]] == [tenant_backup.id] and b["tenant_backups"][0]["key_destroyed"]
    assert [x["id"] for x in b["platform_backups"]] == [platform_backup.id]
    assert b["platform_backups"][0]["expires_by"]
    (tmp_path / "after").mkdir()
    with pytest.raises(crypto.MissingKey, match="crypto-shredded"):
        _fetch(env.settings, env.environ, tenant_backup.id, tmp_path / "after")
    assert not any((tmp_path / "after").iterdir())

    # the certificate: file = journal = audit entry; no personal data in any of them
    path = Path(out.file)
    assert path.stat().st_mode & 0o077 == 0
    on_disk = json.loads(path.read_text())
    assert certificate.digest(on_disk) == out.sha256
    with env.connect() as conn:
        row = conn.execute("SELECT certificate, certificate_sha256 FROM gdpr_runs WHERE request_id = %s", (rid,)).fetchone()
    assert row[1] == out.sha256 and certificate.digest(row[0]) == out.sha256
    entries = [e for e in audit.show(env.ctx, tenant="shop-beta") if e.command == "gdpr delete"]
    assert len(entries) == 1 and entries[0].outcome == "ok"
    assert entries[0].args["certificate_sha256"] == out.sha256 and entries[0].args["certificate"] == out.file
    text = path.read_text() + json.dumps(entries[0].args)
    for m in markers("shop-beta") + [billing_marker("shop-beta"), "10.", "@"]:
        assert m not in text, m

    # the same command again: nothing happens, the certificate is printed
    again = workflow.delete(env.ctx, "shop-beta", rid)
    assert again.already_done and again.sha256 == out.sha256
    with env.connect() as conn:
        assert snapshot(conn, exclude_tenant=target) == others_before


def test_refusals(gdpr_env, pg_super):
    from dn import db, locks

    env = gdpr_env
    ids = _three_tenants(env, events=20)
    with env.connect() as conn:
        rid = add_request(conn, ids["shop-beta"])
        other = add_request(conn, ids["shop-gamma"])
    with pytest.raises(InvalidInput, match="no tenant named 'shop-nope'"):
        workflow.delete(env.ctx, "shop-nope", rid, dry_run=True)
    with pytest.raises(InvalidInput, match=f"deletion request {other} is not a request of tenant shop-beta"):
        workflow.delete(env.ctx, "shop-beta", other)
    with pytest.raises(InvalidInput, match="no deletion request 9999"):
        workflow.delete(env.ctx, "shop-beta", 9999)
    with pytest.raises(InvalidInput, match="--request-id"):
        workflow.delete(env.ctx, "shop-beta", 0)

    # a table nobody classified: refused, named, nothing changed
    pg_super.execute("CREATE TABLE marketing_contacts (tenant_id bigint, email text)")
    try:
        with pytest.raises(PolicyViolation, match="marketing_contacts") as e:
            workflow.delete(env.ctx, "shop-beta", rid)
        assert e.value.exit_code == 4
    finally:
        pg_super.execute("DROP TABLE marketing_contacts")

    # another operation holds the tenant's lock: exit 5, nothing changed
    with db.connect(env.settings.database) as holder:
        locks.acquire(holder, ["tenant:shop-beta"], locks.Claimant.this_process("user:other", "tenant update", "req-other"), 1)
        with pytest.raises(Locked, match="tenant update") as e:
            workflow.delete(env.ctx, "shop-beta", rid)
        assert e.value.exit_code == 5
        locks.release(holder, ["tenant:shop-beta"], "req-other")
    with env.connect() as conn:
        assert conn.execute("SELECT status FROM tenants WHERE id = %s", (ids["shop-beta"],)).fetchone()[0] == "active"
        assert conn.execute("SELECT count(*) FROM gdpr_runs").fetchone()[0] == 0


def test_writes_for_a_tenant_being_deleted_are_refused(gdpr_env):
    from dn import db

    env = gdpr_env
    ids = _three_tenants(env, events=50)
    target, other = ids["shop-beta"], ids["shop-alpha"]
    with env.connect() as conn:
        rid = add_request(conn, target)
    attempts = {}

    def on_event(step, phase, detail):
        if (step, phase) == ("luks", "start"):  # the tenant was disabled just before
            with db.connect(env.settings.database) as w:
                for what, q, p in (
                        ("insert event", "INSERT INTO events (tenant_id, event_name) VALUES (%s, 'page_view')", (target,)),
                        ("insert user", "INSERT INTO users (tenant_id, email, password_hash) VALUES (%s, 'x@y.example', "
                                        "'pbkdf2_sha256$1$a$b')", (target,)),
                        ("update api key", "UPDATE api_keys SET last_used_at = now() WHERE tenant_id = %s", (target,)),
                        ("reactivate", "UPDATE tenants SET status = 'active' WHERE id = %s", (target,))):
                    try:
                        w.execute(q, p)
                        attempts[what] = "accepted"
                    except Exception as e:  # the database refuses
                        attempts[what] = str(e).splitlines()[0]
                w.execute("INSERT INTO events (tenant_id, event_name) VALUES (%s, 'page_view')", (other,))

    out = workflow.delete(env.ctx, "shop-beta", rid, on_event=on_event)
    assert set(attempts) == {"insert event", "insert user", "update api key", "reactivate"}
    for what in ("insert event", "insert user", "update api key"):
        assert "being deleted" in attempts[what], (what, attempts[what])
    assert "cannot become active" in attempts["reactivate"]
    assert certificate.check(out.certificate) == []
    with env.connect() as conn:
        assert conn.execute("SELECT count(*) FROM events WHERE tenant_id = %s", (other,)).fetchone()[0] == 51
        assert conn.execute("SELECT count(*) FROM events WHERE tenant_id = %s", (target,)).fetchone()[0] == 0


def test_a_write_in_flight_when_the_deletion_starts_is_deleted_with_the_rest(gdpr_env):
    """A writer that already inserted (uncommitted) holds the tenant row: disabling waits for it,
    so its rows are counted and deleted, never left behind."""
    from dn import db

    env = gdpr_env
    ids = _three_tenants(env, events=10)
    target = ids["shop-beta"]
    with env.connect() as conn:
        rid = add_request(conn, target)
    writer = db.connect(env.settings.database)
    writer.execute("BEGIN")
    writer.execute("INSERT INTO events (tenant_id, event_name) SELECT %s, 'late' FROM generate_series(1, 7)", (target,))
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("out", workflow.delete(env.ctx, "shop-beta", rid)))
    t.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with env.connect() as conn:
                state = conn.execute("SELECT state FROM gdpr_steps WHERE request_id = %s AND step = 'disable'",
                                     (rid,)).fetchone()
            if state:
                break
            time.sleep(0.05)
        assert state == ("started",)
        time.sleep(0.5)
        with env.connect() as conn:  # still waiting for the writer
            assert conn.execute("SELECT state FROM gdpr_steps WHERE request_id = %s AND step = 'disable'",
                                (rid,)).fetchone() == ("started",)
    finally:
        writer.execute("COMMIT")
        writer.close()
        t.join(120)
    out = result["out"]
    assert out.certificate["counts"]["events"] == {"before": 17, "after": 0, "action": "deleted"}


def test_cli_dry_run_delete_and_status(gdpr_env, tmp_path):
    from tests.fixtures.postgres import to_toml

    env = gdpr_env
    ids = _three_tenants(env, events=30)
    with env.connect() as conn:
        rid = add_request(conn, ids["shop-beta"], received_days_ago=28)
    cfg = tmp_path / "dn.toml"
    cfg.write_text(to_toml(env.data) + "\n")
    cli_env = {**env.environ, "DN_CONFIG": str(cfg), "DN_HOME": env.data["data_dir"]}
    dn = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "dn")

    def run(*args):
        return subprocess.run([dn, *args], env=cli_env, capture_output=True, text=True, timeout=300)

    r = run("gdpr", "status", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert [o["request_id"] for o in st["open"]] == [rid] and st["open"][0]["days_left"] == 1
    r = run("gdpr", "delete", "shop-beta", "--request-id", str(rid), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert re.search(r"- events +30 rows", r.stdout), r.stdout
    assert "1 day(s) left" in r.stdout
    r = run("gdpr", "delete", "shop-beta", "--request-id", str(rid))  # no terminal, no --yes
    assert r.returncode == 2 and "--yes" in r.stderr
    r = run("gdpr", "delete", "shop-nope", "--request-id", str(rid), "--yes")
    assert r.returncode == 2 and "no tenant named 'shop-nope'" in r.stderr
    r = run("gdpr", "delete", "shop-beta", "--request-id", str(rid), "--yes")
    assert r.returncode == 0, r.stderr
    assert "Deletion certificate" in r.stdout and "events" in r.stdout
    r = run("gdpr", "delete", "shop-beta", "--request-id", str(rid), "--yes", "--json")
    assert r.returncode == 0 and "already completed" in r.stderr
    assert json.loads(r.stdout)["certificate"]["request_id"] == rid
    r = run("gdpr", "status", "--json")
    st = json.loads(r.stdout)
    assert st["open"] == [] and st["finished"][0]["request_id"] == rid and st["finished"][0]["on_time"]
    r = run("gdpr", "status")
    assert r.returncode == 0 and f"#{rid}" in r.stdout and "certificate" in r.stdout
    # registering a request by hand
    r = run("gdpr", "request", "shop-gamma", "--received", "2999-01-01")
    assert r.returncode == 2 and "future" in r.stderr
    r = run("gdpr", "request", "shop-gamma", "--json")
    assert r.returncode == 0, r.stderr
    new = json.loads(r.stdout)
    r = run("gdpr", "request", "shop-gamma")
    assert r.returncode == 2 and f"open deletion request {new['request_id']}" in r.stderr


def test_resources_left_on_the_host_stop_the_deletion_loudly(gdpr_env, sandbox):
    """With no stack to destroy, a network, chain or timer of the tenant still on the host is
    named and the deletion stops at that step; once they are gone, the same command completes."""
    from dn.errors import OperationFailed
    from dn.gdpr.resources import host_names

    env = gdpr_env
    ids = _three_tenants(env, events=10)
    with env.connect() as conn:
        rid = add_request(conn, ids["shop-beta"])
    names = host_names(env.settings, "shop-beta", "sandbox-eu1")
    chain = names.chains[0]
    timer = Path(names.timers[0])
    sandbox.docker(["network", "create", names.network])
    sandbox.ns_exec(["iptables", "-w", "-N", chain])
    timer.parent.mkdir(parents=True, exist_ok=True)
    timer.write_text("[Timer]\nOnCalendar=daily\n")
    try:
        with pytest.raises(OperationFailed) as e:
            workflow.delete(env.ctx, "shop-beta", rid)
        msg = str(e.value)
        assert f"docker network {names.network}" in msg and f"iptables chain {chain}" in msg and str(timer) in msg
        assert "ip6tables" not in msg and "docker container" not in msg
        with env.connect() as conn:
            steps = dict(conn.execute("SELECT step, state FROM gdpr_steps WHERE request_id = %s", (rid,)).fetchall())
            assert steps == {"disable": "done", "luks": "done", "stack": "started"}
            assert conn.execute("SELECT count(*) FROM events WHERE tenant_id = %s", (ids["shop-beta"],)).fetchone()[0] == 10
    finally:
        sandbox.docker(["network", "rm", names.network], check=False)
        sandbox.ns_exec(["iptables", "-w", "-X", chain], check=False)
        timer.unlink(missing_ok=True)
    out = workflow.delete(env.ctx, "shop-beta", rid)
    assert certificate.check(out.certificate) == []
    stack_step = next(s for s in out.certificate["steps"] if s["step"] == "stack")
    assert stack_step["attempts"] == 2


def test_the_luks_volume_is_crypto_erased_with_luksdump_evidence(gdpr_env):
    """A real LUKS2 volume (dn.host.luks) and a header backup of it on the sandbox host: after the
    deletion both were erased (luksDump: no keyslot) and removed."""
    from dn import ssh
    from dn.gdpr.resources import host_names, luks_keyslots
    from dn.host import luks

    env = gdpr_env
    ids = _three_tenants(env, events=10)
    with env.connect() as conn:
        rid = add_request(conn, ids["shop-beta"])
    names = host_names(env.settings, "shop-beta", "sandbox-eu1")
    spec = luks.VolumeSpec(name="shop-beta", image=names.volume, size_mb=32, mapper=names.mapper, mount=names.mount)
    header = names.volume + luks.HEADER_SUFFIX
    key = luks.new_key()
    with ssh.connect(env.settings.host("sandbox-eu1")) as s:
        try:
            luks.converge(s, spec, key)
            s.run(["cryptsetup", "luksHeaderBackup", spec.image, "--header-backup-file", header])
            assert s.run(["cryptsetup", "open", "--test-passphrase", "--key-file=-", spec.image], stdin=key).ok
            out = workflow.delete(env.ctx, "shop-beta", rid)
            ev = out.certificate["luks"]
            assert ev["present"] is True and sorted(ev["files_before"]) == sorted([spec.image, header])
            assert ev["keyslots_before"] == {spec.image: [0], header: [0]}
            assert ev["files_after"] == [] and ev["evidence_missing"] == []
            for f in (spec.image, header):
                assert ev["after_erase"][f]["keyslots"] == []
                dump = ev["after_erase"][f]["luks_dump"]
                assert "Keyslots:" in dump and luks_keyslots(dump) == [] and "aes-xts-plain64" in dump
            assert not s.exists(spec.image) and not s.exists(header)
        finally:
            for f in (spec.image, header):
                s.remove(f, missing_ok=True)


def test_luks_keyslot_parser_on_real_luksdump_output(tmp_path):
    """The text parser against real cryptsetup output: one slot, two slots, erased (LUKS2 and LUKS1)."""
    from dn.gdpr.resources import luks_keyslots

    img, k1, k2 = tmp_path / "v.img", tmp_path / "k1", tmp_path / "k2"
    k1.write_bytes(b"first test key")
    k2.write_bytes(b"second test key")
    for typ, cost in (("luks2", ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]), ("luks1", ["--iter-time", "1"])):
        subprocess.run(["truncate", "-s", "20M", str(img)], check=True)
        subprocess.run(["cryptsetup", "luksFormat", "--batch-mode", "--type", typ, *cost, "--key-file", str(k1), str(img)],
                       check=True)

        def dump():
            return subprocess.run(["cryptsetup", "luksDump", str(img)], capture_output=True, text=True, check=True).stdout

        assert luks_keyslots(dump()) == ["0"], typ
        subprocess.run(["cryptsetup", "luksAddKey", "--batch-mode", *cost, "--key-file", str(k1), str(img), str(k2)],
                       check=True)
        assert luks_keyslots(dump()) == ["0", "1"], typ
        subprocess.run(["cryptsetup", "erase", "--batch-mode", str(img)], check=True)
        assert luks_keyslots(dump()) == [], typ
        img.unlink()
