"""Pulumi's stack lock after a crash, against the real Pulumi CLI and a file backend.

A run killed (SIGKILL, its whole process group: dn, the Pulumi CLI, the provider) while the
update holds the stack's lock leaves the lock file behind. The next run takes it over when its
holder is provably dead (this machine, its pid gone), with the takeover handed to the caller for
the audit, and converges; a live holder's lock is never removed, and neither is a lock whose
holder runs elsewhere until it is older than the bound.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dn import engine
from dn.errors import DnError, ExitCode, Locked
from tests.integration.test_engine import (  # noqa: F401 (fixtures)
    REPO,
    backend_dir,
    env,
    file_program,
    needs_cli,
    open_stack,
    settings,
)

pytestmark = [pytest.mark.engine, needs_cli]

HOLD = """
import os, sys
from pathlib import Path
from dn import engine
from dn.config import load_settings
from tests.integration.test_engine import file_program, open_stack
target, release = Path(sys.argv[1]), Path(sys.argv[2])
st = open_stack(load_settings(), dict(os.environ), file_program(target, "slow", hold_until=release), name="crashy")
engine.up(st)
"""


def lock_files(settings, name: str) -> list[Path]:
    return sorted((backend_dir(settings) / ".pulumi" / "locks").glob(f"*/dn/{name}/*.json"))


def wait_for_lock(settings, name: str, timeout: float = 90) -> Path:
    deadline = time.monotonic() + timeout
    while not lock_files(settings, name):
        assert time.monotonic() < deadline, "the update never took the stack lock"
        time.sleep(0.1)
    return lock_files(settings, name)[0]


def test_a_killed_updates_stack_lock_is_taken_over_and_the_rerun_converges(settings, env, tmp_path):
    target, release = tmp_path / "out" / "crash.conf", tmp_path / "never"
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(target), str(release)], env=env, cwd=REPO,
                         start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lock = wait_for_lock(settings, "crashy")
        holder = json.loads(lock.read_text())
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the crash: dn, the Pulumi CLI and its provider at once
        p.wait(30)
    assert lock.exists() and holder["hostname"] == socket.gethostname()

    st = open_stack(settings, env, file_program(target, "after the crash"), name="crashy")
    # Without a takeover handler (no audit possible) the lock stays an error: exit 5, untouched.
    with pytest.raises(Locked) as ei:
        engine.up(st)
    assert ei.value.exit_code == ExitCode.LOCKED and f"(pid {holder['pid']})" in str(ei.value)
    assert lock.exists()

    taken: list = []
    out = engine.up(st, on_lock_takeover=lambda lk, why: taken.append((lk, why)), stale_after=3600)
    assert [(lk.path, lk.pid) for lk, _ in taken] == [(str(lock), holder["pid"])]
    assert f"pid {holder['pid']}" in taken[0][1] and ("is gone" in taken[0][1] or "has exited" in taken[0][1])
    assert [x.path for x in out.lock_takeovers] == [str(lock)]
    assert not lock.exists() and lock_files(settings, "crashy") == []
    assert target.read_text().startswith("after the crash")
    # converged: the next run has nothing to do and no lock to take
    again = engine.up(st, on_lock_takeover=lambda lk, why: taken.append((lk, why)), stale_after=3600)
    assert again.changed == 0 and len(taken) == 1
    engine.destroy(st, remove=True)


def test_a_live_holders_stack_lock_is_never_taken_over(settings, env, tmp_path):
    release = tmp_path / "release"
    target = tmp_path / "out" / "slow.conf"
    holder = open_stack(settings, env, file_program(target, "slow", hold_until=release), name="busy")
    result: dict = {}

    def run() -> None:
        try:
            result["outcome"] = engine.up(holder)
        except Exception as e:  # surfaced by the assertion below
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    taken: list = []
    try:
        lock = wait_for_lock(settings, "busy")
        second = open_stack(settings, env, file_program(target, "slow"), name="busy")
        with pytest.raises(Locked) as ei:
            engine.up(second, on_lock_takeover=lambda lk, why: taken.append(lk), stale_after=600)
        assert ei.value.exit_code == ExitCode.LOCKED and f"(pid {json.loads(lock.read_text())['pid']})" in str(ei.value)
        assert taken == [] and lock.exists()
    finally:
        release.touch()
        t.join(120)
    assert "error" not in result, result.get("error")
    engine.destroy(holder, remove=True)


def _pulumi_lock(settings, name: str, *, hostname: str, pid: int, age: timedelta) -> Path:
    """A lock file as Pulumi's file backend writes one (diy/lock.go: pid, username, hostname, time)."""
    d = backend_dir(settings) / ".pulumi" / "locks" / "organization" / "dn" / name
    d.mkdir(parents=True, exist_ok=True)
    f = d / f"{os.urandom(8).hex()}.json"
    at = (datetime.now(UTC) - age).strftime("%Y-%m-%dT%H:%M:%S.%f123Z")
    f.write_text(json.dumps({"pid": pid, "username": "ops", "hostname": hostname, "timestamp": at}))
    return f


def test_a_holder_on_another_machine_is_taken_over_only_after_the_bound(settings, env, tmp_path):
    target = tmp_path / "out" / "far.conf"
    st = open_stack(settings, env, file_program(target, "far"), name="far")
    engine.up(st)
    taken: list = []
    young = _pulumi_lock(settings, "far", hostname="elsewhere.example", pid=4242, age=timedelta(minutes=5))
    with pytest.raises(Locked, match="ops@elsewhere.example"):
        engine.up(st, on_lock_takeover=lambda lk, why: taken.append(why), stale_after=3600)
    assert young.exists() and taken == []
    young.unlink()
    # a file that cannot be read is never judged dead (Pulumi itself fails on it)
    bad = _pulumi_lock(settings, "far", hostname=socket.gethostname(), pid=4242, age=timedelta(hours=9))
    bad.write_text("{not json")
    assert engine.stack_locks(settings.backend_url, "far")[0].dead(1) is None
    with pytest.raises(DnError):
        engine.up(st, on_lock_takeover=lambda lk, why: taken.append(why), stale_after=3600)
    assert bad.exists() and taken == []
    bad.unlink()
    old = _pulumi_lock(settings, "far", hostname="elsewhere.example", pid=4242, age=timedelta(hours=2))
    engine.up(st, on_lock_takeover=lambda lk, why: taken.append(why), stale_after=3600)
    assert not old.exists() and len(taken) == 1 and "another machine (elsewhere.example)" in taken[0]
    # on this machine: a pid that runs and is older than the lock is its holder, alive ...
    mine = _pulumi_lock(settings, "far", hostname=socket.gethostname(), pid=os.getpid(), age=timedelta(0))
    with pytest.raises(Locked):
        engine.up(st, on_lock_takeover=lambda lk, why: taken.append(why), stale_after=1)
    assert mine.exists() and len(taken) == 1
    mine.unlink()
    # ... a pid that started after the lock was taken is another process: the holder is dead
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        reused = _pulumi_lock(settings, "far", hostname=socket.gethostname(), pid=sleeper.pid, age=timedelta(hours=1))
        engine.up(st, on_lock_takeover=lambda lk, why: taken.append(why), stale_after=30 * 86400)
        assert not reused.exists() and len(taken) == 2 and "is now another process" in taken[1]
    finally:
        sleeper.kill()
        sleeper.wait()
    engine.destroy(st, remove=True)


# --------------------------------------------------------------------------- dn on the sandbox host

SLUG = "crash-acme"
DOMAIN = "gtm.crash-acme.example"
CONFIG = "Y3Jhc2gtYWNtZS1jb250YWluZXItY29uZmlnLXNlY3JldA=="
CIPHERTEXT_RE = r"v1:[A-Za-z0-9+/=]{8,}:[A-Za-z0-9+/=:]{8,}"


@pytest.fixture
def host_env(sandbox, dn_settings_data, tmp_path, pg_super):
    """dn for the sandbox host with its own data dir, the host baseline up and the tenant's
    certificate installed, while this test holds the shared sandbox host."""
    import uuid

    from dn.models import HostBaseline
    from dn.sandbox import issue_certificate as sandbox_cert
    from tests.fixtures.sandbox import host_lock, remove_backup_dir
    from tests.integration.test_gdpr_setup import fernet_key, wipe_gdpr
    from tests.stacks import e2e

    if e2e.engine_missing():
        pytest.skip(e2e.engine_missing())
    e2e.ensure_host_dn()
    wipe_gdpr(pg_super)
    path = f"/backups/test-crash-{uuid.uuid4().hex[:10]}"
    backup = {**sandbox.settings.backup.model_dump(mode="json", exclude_none=True), "path": path, "retries": 1}
    with host_lock():
        env = e2e.make_env(sandbox, dn_settings_data, tmp_path, backup=backup, plans={
            "standard": {},
            "large": {"rate_per_ip": 40, "burst_per_ip": 80, "rate_per_tenant": 800, "burst_per_tenant": 1600},
        })
        env.env["DN_FERNET_KEYS"] = fernet_key()
        env.write_config(env.config)
        host = HostBaseline.from_settings(env.settings)
        files = list(sandbox_cert(host.prefix, host.cert_dir, [DOMAIN], days=1))
        code, _, err = env.dn_json("host", "up")
        assert code == 0, err
        try:
            yield env
        finally:
            if (Path(env.settings.data_dir) / "stacks" / SLUG).exists():
                env.dn("tenant", "destroy", SLUG, "--yes")
            for f in files:
                f.unlink(missing_ok=True)
            remove_backup_dir(env.settings.backup, path)
            wipe_gdpr(pg_super)


def dn_popen(env, *argv: str, stdin: str | None = None) -> subprocess.Popen:
    """`dn ARGV` in a session of its own, so that the crash takes its whole process group."""
    p = subprocess.Popen([sys.executable, "-c", "from cli.main import run; run()", *argv], env=env.env, cwd=REPO,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    if stdin is not None:
        p.stdin.write(stdin)
    p.stdin.close()
    return p


def kill_while_locked(env, p: subprocess.Popen, name: str, settle: float = 2.0) -> dict:
    """SIGKILL ``p``'s whole process group while Pulumi holds stack ``name``'s lock (its update
    runs); returns the lock file's holder."""
    deadline = time.monotonic() + 300
    try:
        while not lock_files(env.settings, name):
            assert p.poll() is None, f"dn ended before taking the stack lock: {p.stderr.read()}"
            assert time.monotonic() < deadline, "the update never took the stack lock"
            time.sleep(0.05)
        holder = json.loads(lock_files(env.settings, name)[0].read_text())
        time.sleep(settle)  # let the update get under way
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(30)
    assert p.returncode == -signal.SIGKILL
    return holder


def audit_rows(env, command: str) -> list[dict]:
    from dn import db

    with db.connect(env.settings.database) as conn:
        return db.rows(conn, "SELECT command, tenant, host, outcome, args FROM audit_log WHERE command = %s ORDER BY seq",
                       (command,))


def stack_files(env, name: str) -> list[Path]:
    """Every file in the state backend and the work dirs that names the stack."""
    roots = [backend_dir(env.settings), Path(env.settings.data_dir) / "stacks"]
    return [p for r in roots if r.is_dir() for p in r.rglob("*") if p.is_file() and any(
        x == name or x.startswith(f"{name}.") or re.match(rf"^{re.escape(name)}-\d+\.", x)
        for x in p.relative_to(r).parts)]


def test_crashed_tenant_create_update_and_gdpr_delete_converge_on_rerun(host_env, sandbox):
    env = host_env

    # -- `dn tenant create` killed while its update holds the stack lock
    p = dn_popen(env, "tenant", "create", SLUG, "--domain", DOMAIN, "--container-config-stdin", stdin=CONFIG)
    dead = kill_while_locked(env, p, SLUG)
    assert lock_files(env.settings, SLUG), "the crash left no stack lock: nothing to recover from"
    r = env.dn("lock", "list", "--json")
    stale = {h["resource"]: h for h in json.loads(r.stdout)}
    assert {"tenant:" + SLUG, "host:sandbox-eu1"} <= set(stale), stale
    # the rerun of the same command needs no manual step
    r = env.dn("tenant", "create", SLUG, "--domain", DOMAIN, "--container-config-stdin", input=CONFIG)
    assert r.returncode == 0, r.stderr
    assert lock_files(env.settings, SLUG) == []
    taken = audit_rows(env, "lock takeover")
    assert sorted(t["args"]["resource"] for t in taken) == sorted(["tenant:" + SLUG, "host:sandbox-eu1",
                                                                   "stack:" + SLUG])
    (pulumi_lock,) = [t for t in taken if t["args"]["resource"] == "stack:" + SLUG]
    assert pulumi_lock["args"]["holder"]["pid"] == dead["pid"] and pulumi_lock["tenant"] == SLUG
    assert pulumi_lock["args"]["taken_by"] == "up" and f"pid {dead['pid']}" in pulumi_lock["args"]["reason"]
    code, shown, err = env.dn_json("tenant", "show", SLUG)
    assert code == 0 and shown["stack"]["last_result"] == "succeeded", err

    # -- `dn tenant update` killed the same way; meanwhile a live run is never stolen from
    p = dn_popen(env, "tenant", "update", SLUG, "--plan", "large")
    deadline = time.monotonic() + 300
    while not lock_files(env.settings, SLUG):
        assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() is not None else "slow"
        time.sleep(0.05)
    # Stopped (SIGSTOP), the first run is alive but cannot finish meanwhile: the second run meets its
    # locks however long it takes to start.
    # It stays stopped until the kill below: a crash in the middle of its update.
    os.killpg(p.pid, signal.SIGSTOP)
    try:
        second = env.dn("tenant", "update", SLUG, "--plan", "large")
        held = lock_files(env.settings, SLUG)
    except BaseException:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    assert second.returncode == ExitCode.LOCKED, second.stderr
    assert "is locked by user:" in second.stderr and "running 'tenant update'" in second.stderr
    assert "no longer alive" not in second.stderr and held
    assert len(audit_rows(env, "lock takeover")) == 3
    kill_while_locked(env, p, SLUG, settle=0.5)
    r = env.dn("tenant", "update", SLUG, "--plan", "large")
    assert r.returncode == 0, r.stderr
    assert len(audit_rows(env, "lock takeover")) == 6 and lock_files(env.settings, SLUG) == []
    r = env.dn("tenant", "update", SLUG, "--plan", "large")
    assert r.returncode == 0, r.stderr
    assert len(audit_rows(env, "lock takeover")) == 6  # nothing stale any more

    # the stack's secrets now sit in its checkpoints, backups and work dir
    own = stack_files(env, SLUG)
    markers = {m for f in own for m in re.findall(CIPHERTEXT_RE, f.read_text(errors="replace"))}
    assert any("/backups/" in str(f) for f in own) and markers

    # -- `dn gdpr delete` killed in its stack step, while Pulumi holds the stack's lock
    code, req, err = env.dn_json("gdpr", "request", SLUG)
    assert code == 0, err
    rid = str(req["request_id"])
    p = dn_popen(env, "gdpr", "delete", SLUG, "--request-id", rid, "--yes")
    kill_while_locked(env, p, SLUG, settle=0.5)
    code, out, err = env.dn_json("gdpr", "delete", SLUG, "--request-id", rid, "--yes")
    assert code == 0, err
    steps = {s["step"]: s for s in out["certificate"]["steps"]}
    assert steps["stack"]["attempts"] == 2
    assert {t["args"]["resource"] for t in audit_rows(env, "lock takeover")[6:]} == {"tenant:" + SLUG,
                                                                                    "stack:" + SLUG}

    # -- nothing of the stack's state is left anywhere dn keeps state, and the certificate says so
    state = out["certificate"]["stack"]["state"]
    assert state["checked"] and state["remaining"] == [] and state["ciphertexts_and_salts_searched_for"] > 0
    assert str(backend_dir(env.settings)) in state["searched"]
    assert stack_files(env, SLUG) == []
    roots = [backend_dir(env.settings), Path(env.settings.data_dir) / "stacks"]
    assert [p for r in roots for p in r.rglob("*") if p.is_file()
            and any(m in p.read_text(errors="replace") for m in markers)] == []
    code, verified, err = env.dn_json("verify", "--check", "gdpr.state-purged")
    (result,) = verified["results"]
    assert code == 0 and result["status"] == "PASS", (result, err)
    # the check fails on a copy left behind (here: what Pulumi's plain `stack rm` keeps)
    left = backend_dir(env.settings) / ".pulumi" / "stacks" / "dn" / f"{SLUG}.json.bak"
    left.write_text("{}")
    try:
        code, verified, err = env.dn_json("verify", "--check", "gdpr.state-purged")
        (result,) = verified["results"]
        assert code == ExitCode.POLICY and result["status"] == "FAIL", (result, err)
        assert any(str(left) in line for line in result["evidence"]), result
    finally:
        left.unlink()
