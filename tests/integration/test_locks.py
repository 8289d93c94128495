"""Operation locks against a real PostgreSQL: contention, waiting, stale holders, breaking, CLI."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dn import audit, db, locks
from dn.context import Context
from dn.errors import ExitCode, InvalidInput, Locked, OperationFailed

pytestmark = pytest.mark.postgres
ROOT = Path(__file__).resolve().parents[2]
DN = str(ROOT / ".venv" / "bin" / "dn")


def cli(args, env):
    return subprocess.run([DN, *args], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.fixture
def other(dn_ctx, dn_settings):
    """A second operator run (its own request id) on the same settings."""
    return Context(environ=dn_ctx.environ, _settings=dn_settings)


def test_second_operation_on_a_tenant_fails_naming_the_holder(dn_ctx, other):
    with audit.privileged(other, "tenant update", {"plan": "standard"}, tenant="acme", host="test-eu1"):
        started = time.monotonic()
        with pytest.raises(Locked) as ei:
            with audit.privileged(dn_ctx, "tenant delete", {}, tenant="acme"):
                pytest.fail("ran without the lock")
        waited = time.monotonic() - started
    e = ei.value
    assert e.exit_code == ExitCode.LOCKED and e.where == "tenant:acme"
    msg = str(e)
    for part in (other.actor, "'tenant update'", other.request_id, f"pid {os.getpid()}", socket.gethostname(),
                 "since ", "UTC", "waited 2s"):
        assert part in msg, part
    assert e.runbook == "incident-response#a-lock-is-held"
    assert waited >= 1.5  # it did wait for database.lock_timeout (2 s in the test settings) before giving up


def test_host_lock_serializes_tenants_on_that_host(dn_ctx, other):
    with audit.privileged(other, "host baseline", {}, host="test-eu1"):
        with pytest.raises(Locked, match="host:test-eu1 is locked by"):
            with audit.privileged(dn_ctx, "tenant update", {}, tenant="acme", host="test-eu1"):
                pass
        # Another tenant without the host runs; a partial acquisition released its tenant lock.
        with audit.privileged(dn_ctx, "tenant update", {}, tenant="acme"):
            pass


def test_different_tenants_run_at_once(dn_ctx, other):
    with audit.privileged(other, "tenant update", {}, tenant="acme"):
        with audit.privileged(dn_ctx, "tenant update", {}, tenant="beta"):
            pass


def test_waiter_gets_the_lock_when_the_holder_finishes(dn_ctx, other):
    holding = threading.Event()

    def hold():
        with audit.privileged(other, "tenant update", {}, tenant="acme"):
            holding.set()
            time.sleep(0.7)

    t = threading.Thread(target=hold)
    t.start()
    assert holding.wait(10)
    started = time.monotonic()
    with audit.privileged(dn_ctx, "tenant delete", {}, tenant="acme"):
        waited = time.monotonic() - started
    t.join()
    assert waited > 0.2  # it had to wait ...
    first, second = audit.show(dn_ctx)
    assert (first.request_id, second.request_id) == (other.request_id, dn_ctx.request_id)  # ... and ran after
    assert second.outcome == "ok"


def test_nested_lock_on_the_same_resource_fails_fast(dn_ctx):
    with audit.privileged(dn_ctx, "tenant update", {}, tenant="acme"):
        started = time.monotonic()
        with pytest.raises(OperationFailed, match="already locked by this same operation"):
            with audit.privileged(dn_ctx, "tenant update (inner)", {}, tenant="acme"):
                pass
        assert time.monotonic() - started < 1.5
        with audit.privileged(dn_ctx, "tenant update (inner)", {}, tenant="acme", lock=False):
            pass


@pytest.mark.parametrize("bad", ["acme", "tenant:", "tenant:Acme", "user:root", "tenant:acme; DROP TABLE x"])
def test_bad_resource_names(bad):
    with pytest.raises(InvalidInput) as ei:
        locks.parse_resource(bad)
    assert ei.value.field == "RESOURCE" and "KIND:NAME" in ei.value.rule


def test_cli_contention_exits_5_naming_the_holder(dn_ctx, dn_cli_env):
    with audit.privileged(dn_ctx, "tenant update", {}, tenant="acme"):
        r = cli(["lock", "list", "--json"], dn_cli_env)
        assert r.returncode == 0, r.stderr
        (h,) = json.loads(r.stdout)
        assert (h["resource"], h["alive"], h["state"], h["request_id"], h["pid"]) == (
            "tenant:acme", True, "held", dn_ctx.request_id, os.getpid())
        # A live lock is never broken.
        r = cli(["lock", "break", "tenant:acme"], dn_cli_env)
        assert r.returncode == ExitCode.LOCKED, r.stderr
        assert "tenant:acme is held by a live run" in r.stderr and dn_ctx.request_id in r.stderr
    with audit.privileged(dn_ctx, "audit prune", {}, lock=["audit:prune"]):
        r = cli(["audit", "prune"], dn_cli_env)
    assert r.returncode == ExitCode.LOCKED, r.stderr
    assert "audit:prune is locked by" in r.stderr and "'audit prune'" in r.stderr and dn_ctx.request_id in r.stderr
    assert "dn runbook show incident-response#a-lock-is-held" in r.stderr
    refused = audit.show(dn_ctx)[-2]  # the CLI's own refused attempt is audited too
    assert (refused.command, refused.outcome, refused.exit_code) == ("audit prune", "failed", 5)
    # Entries are in the order operations finished: the refused break ended while the update ran.
    assert [e.command for e in audit.show(dn_ctx)] == ["lock break", "tenant update", "audit prune", "audit prune"]


CRASH = """
import os, signal
from dn import audit
from dn.context import Context
ctx = Context()
with audit.privileged(ctx, "tenant update", {"plan": "standard"}, tenant="acme", host="test-eu1"):
    print(ctx.request_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""

# A holder whose database session ends while its process goes on (a dropped connection): stale
# in the database, alive on the machine.
SESSION_LOST = """
import sys, time
from dn import db, locks
from dn.context import Context
ctx = Context()
conn = db.connect(ctx.settings.database)
locks.acquire(conn, ["tenant:acme"], locks.Claimant.this_process(ctx.actor, "tenant update", ctx.request_id), 5)
conn.close()
print(ctx.request_id, flush=True)
time.sleep(120)
"""


def wait_stale(env, resources, timeout=10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:  # the server notices the dead client's closed socket almost at once
        r = cli(["lock", "list", "--json"], env)
        held = {h["resource"]: h for h in json.loads(r.stdout)}
        if (set(resources) <= set(held) and not any(held[x]["alive"] for x in resources)) \
                or time.monotonic() > deadline:
            return held
        time.sleep(0.1)


def takeovers(ctx) -> list:
    return [e for e in audit.show(ctx) if e.command == "lock takeover"]


def test_a_killed_runs_locks_are_taken_over_by_the_rerun_audited(dn_ctx, dn_cli_env):
    r = subprocess.run([sys.executable, "-c", CRASH], env=dn_cli_env, cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    crashed = r.stdout.strip()
    # The crashed run wrote no entry (it never finished) and left both locks behind.
    assert audit.show(dn_ctx) == []
    held = wait_stale(dn_cli_env, {"tenant:acme", "host:test-eu1"})
    assert set(held) == {"tenant:acme", "host:test-eu1"}
    assert all(h["state"] == "stale" and h["request_id"] == crashed for h in held.values())
    assert all("is gone on" in h["holder_dead"] for h in held.values())
    r = cli(["lock", "list"], dn_cli_env)
    assert "tenant:acme" in r.stdout and "STALE" in r.stdout and crashed in r.stdout
    assert "holder dead" in r.stdout and "the next run takes it over" in r.stdout
    # The rerun of the same command needs no manual step: its holder is provably dead (this
    # machine, its pid gone), so the locks are taken over, each with its own audit entry.
    with audit.privileged(dn_ctx, "tenant update", {"plan": "standard"}, tenant="acme", host="test-eu1"):
        with db.connect(dn_ctx.settings.database) as conn:
            mine = locks.holder(conn, "tenant:acme")
        assert mine is not None and mine.alive and mine.request_id == dn_ctx.request_id
    taken = takeovers(dn_ctx)
    assert sorted(e.args["resource"] for e in taken) == ["host:test-eu1", "tenant:acme"]
    for e in taken:
        assert e.outcome == "ok" and e.args["holder"]["request_id"] == crashed
        assert e.args["holder"]["command"] == "tenant update" and e.args["taken_by"] == "tenant update"
        assert "its database session is gone and pid" in e.args["reason"] and "is gone on" in e.args["reason"]
    assert {e.tenant for e in taken} == {"acme", None} and {e.host for e in taken} == {"test-eu1", None}
    assert [e.command for e in audit.show(dn_ctx)] == ["lock takeover", "lock takeover", "tenant update"]
    with db.connect(dn_ctx.settings.database) as conn:
        assert locks.list_locks(conn) == []


def test_a_holder_whose_process_still_runs_is_never_taken_over(dn_ctx, dn_cli_env):
    p = subprocess.Popen([sys.executable, "-c", SESSION_LOST], env=dn_cli_env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        holder_rid = p.stdout.readline().strip()
        assert holder_rid, p.stderr.read()
        held = wait_stale(dn_cli_env, {"tenant:acme"})
        assert held["tenant:acme"]["state"] == "stale" and held["tenant:acme"]["holder_dead"] is None
        with pytest.raises(Locked, match="cannot be proved dead") as ei:
            with audit.privileged(dn_ctx, "tenant update", {}, tenant="acme"):
                pytest.fail("took over a live holder's lock")
        assert "dn lock break tenant:acme" in ei.value.hint and f"pid {p.pid}" in str(ei.value)
        assert takeovers(dn_ctx) == []
        with db.connect(dn_ctx.settings.database) as conn:
            (h,) = locks.list_locks(conn)
            assert h.request_id == holder_rid and h.pid == p.pid
    finally:
        p.kill()
        p.wait(10)
    # once its process is gone, the next run takes the lock over
    with audit.privileged(dn_ctx, "tenant update", {}, tenant="acme"):
        pass
    (e,) = takeovers(dn_ctx)
    assert e.args["holder"]["request_id"] == holder_rid and f"pid {p.pid} is gone" in e.args["reason"]


def _insert_row(conn, res: str, *, pid: int, machine: str, age_s: float = 0.0, **ident) -> None:
    cols = {"boot_id": None, "pid_ns": None, "pid_start": None, **ident}
    conn.execute("INSERT INTO op_locks (resource, lock_key, actor, command, request_id, pid, machine, backend_pid,"
                 " boot_id, pid_ns, pid_start, acquired_at)"
                 " VALUES (%s, %s, 'someone', 'tenant update', 'req-old', %s, %s, 1, %s, %s, %s,"
                 " clock_timestamp() - make_interval(secs => %s))",
                 (res, locks.lock_key(res), pid, machine, cols["boot_id"], cols["pid_ns"], cols["pid_start"], age_s))


def test_a_reused_pid_does_not_keep_a_dead_holders_lock(dn_ctx, dn_settings):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with db.connect(dn_settings.database) as conn:
            # the recorded holder had this pid, but its start time differs: another process now
            _insert_row(conn, "tenant:acme", pid=sleeper.pid, machine=socket.gethostname(), boot_id=locks.boot_id(),
                        pid_ns=locks.pid_namespace(), pid_start=(locks.pid_start(sleeper.pid) or 0) - 5)
            # ... while a row naming that same process exactly is alive on this machine
            _insert_row(conn, "tenant:beta", pid=sleeper.pid, machine=socket.gethostname(), boot_id=locks.boot_id(),
                        pid_ns=locks.pid_namespace(), pid_start=locks.pid_start(sleeper.pid))
        with audit.privileged(dn_ctx, "tenant update", {}, tenant="acme"):
            pass
        (e,) = takeovers(dn_ctx)
        assert e.args["resource"] == "tenant:acme" and "is now another process" in e.args["reason"]
        with pytest.raises(Locked, match="cannot be proved dead"):
            with audit.privileged(dn_ctx, "tenant update", {}, tenant="beta"):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_holder_on_another_machine_is_dead_only_after_the_bound(dn_ctx, dn_settings):
    bound = dn_settings.database.lock_stale_after
    with db.connect(dn_settings.database) as conn:
        _insert_row(conn, "tenant:acme", pid=4242, machine="elsewhere.example", age_s=bound + 60)
        _insert_row(conn, "tenant:beta", pid=4242, machine="elsewhere.example", age_s=bound - 60)
    with audit.privileged(dn_ctx, "tenant update", {}, tenant="acme"):
        pass
    (e,) = takeovers(dn_ctx)
    assert e.args["resource"] == "tenant:acme" and "cannot be checked from here" in e.args["reason"]
    with pytest.raises(Locked, match="cannot be proved dead"):
        with audit.privileged(dn_ctx, "tenant update", {}, tenant="beta"):
            pass


def test_stale_lock_is_broken_explicitly(dn_ctx, dn_cli_env, dn_settings):
    with db.connect(dn_settings.database) as conn:
        _insert_row(conn, "tenant:acme", pid=4242, machine="elsewhere.example")
    r = cli(["lock", "list"], dn_cli_env)
    assert "tenant:acme" in r.stdout and "STALE" in r.stdout and "holder dead" not in r.stdout
    # someone breaks it explicitly, and that is audited with the holder it removed.
    r = cli(["lock", "break", "tenant:acme"], dn_cli_env)
    assert r.returncode == 0, r.stderr
    assert "broke the stale lock on tenant:acme held by" in r.stderr
    entry = audit.show(dn_ctx)[-1]
    assert (entry.command, entry.outcome, entry.tenant) == ("lock break", "ok", "acme")
    assert entry.args["resource"] == "tenant:acme" and entry.args["holder"]["request_id"] == "req-old"
    assert entry.args["holder"]["command"] == "tenant update"
    with audit.privileged(dn_ctx, "tenant update", {}, tenant="acme"):
        pass
    r = cli(["lock", "break", "tenant:acme"], dn_cli_env)
    assert r.returncode == ExitCode.INVALID and "no lock is recorded on tenant:acme" in r.stderr
    r = cli(["lock", "break", "acme"], dn_cli_env)
    assert r.returncode == ExitCode.INVALID and "RESOURCE: 'acme' is not a lock resource" in r.stderr


def test_lock_survives_only_with_its_session(dn_ctx, dn_settings):
    # A holder whose database session drops loses the lock (the server releases it) and its
    # row turns stale; nobody else can then take the resource silently.
    claimant = locks.Claimant.this_process(dn_ctx.actor, "tenant update", dn_ctx.request_id)
    conn = db.connect(dn_settings.database)
    locks.acquire(conn, ["tenant:acme"], claimant, 1)
    with db.connect(dn_settings.database) as watcher:
        (h,) = locks.list_locks(watcher)
        assert h.alive and h.holder_backends == (h.backend_pid,)
        conn.close()
        deadline = time.monotonic() + 10
        while locks.list_locks(watcher)[0].alive and time.monotonic() < deadline:
            time.sleep(0.05)
        (h,) = locks.list_locks(watcher)
        assert not h.alive and h.to_dict()["state"] == "stale"
