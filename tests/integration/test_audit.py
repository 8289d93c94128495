"""The audit log against a real PostgreSQL: privileges, triggers, tampering, prune, concurrency, CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from dn import audit, db
from dn.context import Context
from dn.errors import ExitCode, InvalidInput, Locked, OperationFailed, PolicyViolation
from tests.fixtures.postgres import backdate_audit, tampering

pytestmark = [pytest.mark.postgres, pytest.mark.sandbox]
ROOT = Path(__file__).resolve().parents[2]
DN = str(ROOT / ".venv" / "bin" / "dn")


@pytest.fixture(autouse=True)
def region(audit_region):
    """Every test here runs with a second region (where verification finds the chain's witness)."""
    return audit_region


def cli(args, env):
    return subprocess.run([DN, *args], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)


def append_some(ctx, n, tenant="acme"):
    for i in range(n):
        with audit.privileged(ctx, "tenant update", {"step": i}, tenant=tenant, host="test-eu1"):
            pass


def problems(ctx, **kw):
    return sorted((p.kind, p.seq) for p in audit.verify(ctx, **kw).problems)


# -- privileged() --------------------------------------------------------------------------------
def test_privileged_writes_one_redacted_entry(dn_ctx, pg_super):
    args = {"plan": "standard", "passphrase": "correct horse", "container_config": "aWQ9R1RNLVhYWA==",
            "owner_email": "jana@acme.example", "dsn": "postgresql://dn:hunter2@db/dn"}
    with audit.privileged(dn_ctx, "tenant create", args, tenant="acme", host="test-eu1") as op:
        # While the body runs, the tenant and host are locked by this request.
        held = {r[0]: r[1] for r in pg_super.execute("SELECT resource, request_id FROM op_locks").fetchall()}
        assert held == {"tenant:acme": dn_ctx.request_id, "host:test-eu1": dn_ctx.request_id}
        op.args["containers"] = 2
    (e,) = audit.show(dn_ctx)
    assert e == op.entry
    assert (e.seq, e.command, e.tenant, e.host, e.outcome, e.exit_code) == (1, "tenant create", "acme", "test-eu1", "ok", 0)
    assert e.actor == dn_ctx.actor and e.request_id == dn_ctx.request_id and e.prev_hash == audit.GENESIS
    assert e.actor_key == audit.operator_key_fingerprint(dn_ctx.settings, "test-eu1") and e.actor_key.startswith("SHA256:")
    assert e.args == {"plan": "standard", "passphrase": audit.REDACTED, "container_config": audit.REDACTED,
                      "owner_email": audit.PERSONAL, "dsn": audit.REDACTED, "containers": 2}
    raw = json.dumps(pg_super.execute("SELECT row_to_json(a) FROM audit_log a").fetchone()[0])
    for secret in ("correct horse", "aWQ9R1RNLVhYWA", "jana@", "hunter2"):
        assert secret not in raw
    assert e.compute_hash() == e.hash
    assert pg_super.execute("SELECT count(*) FROM op_locks").fetchone()[0] == 0
    assert audit.verify(dn_ctx).ok


@pytest.mark.parametrize("exc, outcome, code", [
    (RuntimeError("boom"), "failed", 1),
    (OperationFailed("nginx -t failed"), "failed", 1),
    (PolicyViolation("port 8080 published"), "failed", 4),
    (KeyboardInterrupt(), "interrupted", 130),
])
def test_privileged_records_failure_and_releases_the_lock(dn_ctx, pg_super, exc, outcome, code):
    with pytest.raises(type(exc)):
        with audit.privileged(dn_ctx, "tenant update", {}, tenant="acme"):
            raise exc
    (e,) = audit.show(dn_ctx)
    assert (e.outcome, e.exit_code, e.tenant) == (outcome, code, "acme")
    assert pg_super.execute("SELECT count(*) FROM op_locks").fetchone()[0] == 0
    # The lock is free: the next operation on the tenant runs at once.
    with audit.privileged(dn_ctx, "tenant update", {}, tenant="acme"):
        pass
    assert [x.outcome for x in audit.show(dn_ctx)] == [outcome, "ok"]


def test_lock_refusal_is_audited(dn_ctx, dn_settings):
    from dn.context import Context

    other = Context(environ=dn_ctx.environ, _settings=dn_settings)
    with audit.privileged(other, "tenant delete", {}, tenant="acme"):
        with pytest.raises(Locked):
            with audit.privileged(dn_ctx, "tenant update", {}, tenant="acme"):
                pytest.fail("body must not run without the lock")
    first, second = audit.show(dn_ctx)
    assert (first.request_id, first.outcome, first.exit_code) == (dn_ctx.request_id, "failed", 5)
    assert (second.request_id, second.outcome) == (other.request_id, "ok")


# -- what the database allows the day-to-day role ------------------------------------------------
@pytest.mark.parametrize("statement", [
    "UPDATE audit_log SET outcome = 'ok'",
    "DELETE FROM audit_log",
    "TRUNCATE audit_log",
    "UPDATE audit_head SET seq = 0",
    "DELETE FROM audit_anchor",
    "INSERT INTO audit_anchor (anchor_seq, anchor_hash, anchor_at, pruned_from, pruned_count, signed_at, public_key,"
    " signature) VALUES (1, repeat('0', 64), now(), 1, 1, now(), repeat('A', 43) || '=', repeat('A', 86) || '==')",
    "ALTER TABLE audit_log DISABLE TRIGGER audit_log_guard",
])
def test_app_role_cannot_rewrite_the_audit_tables(dn_ctx, dn_settings, statement):
    append_some(dn_ctx, 2)
    with db.connect(dn_settings.database) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(statement)
    assert [e.seq for e in audit.show(dn_ctx)] == [1, 2] and audit.verify(dn_ctx).ok


@pytest.mark.parametrize("statement", ["UPDATE audit_log SET outcome = 'ok'", "DELETE FROM audit_log",
                                       "TRUNCATE audit_log", "TRUNCATE audit_anchor", "DELETE FROM audit_head",
                                       "UPDATE audit_head SET seq = 9"])
def test_triggers_refuse_even_privileged_roles(dn_ctx, pg_super, statement):
    append_some(dn_ctx, 1)
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
        pg_super.execute(statement)  # a superuser must switch the triggers off first (tampering())


def test_app_role_can_only_extend_the_chain(dn_ctx, dn_settings):
    append_some(dn_ctx, 1)
    (e,) = audit.show(dn_ctx)
    cols = ", ".join(audit._COLUMNS)
    with db.connect(dn_settings.database) as c:
        def insert(**over):
            vals = {**{k: getattr(e, k) for k in audit._COLUMNS}, "seq": 2, "prev_hash": e.hash, "hash": "a" * 64,
                    "at": c.execute("SELECT clock_timestamp()").fetchone()[0], **over}
            vals["args"] = db.jsonb(vals["args"])
            c.execute(f"INSERT INTO audit_log ({cols}) VALUES ({', '.join(['%s'] * len(audit._COLUMNS))})",
                      [vals[k] for k in audit._COLUMNS])
        with pytest.raises(psycopg.errors.CheckViolation, match="does not follow the chain head"):
            insert(seq=5)
        with pytest.raises(psycopg.errors.CheckViolation, match="not chained"):
            insert(prev_hash="b" * 64)
        with pytest.raises(psycopg.errors.CheckViolation, match="older than the head"):
            insert(at=e.at.replace(year=2020))
        with pytest.raises(psycopg.errors.CheckViolation, match="time must come from the database clock"):
            insert(at=e.at.replace(year=2099))
        with pytest.raises(psycopg.errors.CheckViolation, match="does not follow the chain head"):
            insert(seq=1, prev_hash=audit.GENESIS)


def test_app_role_cannot_prune_without_writing_an_anchor(dn_ctx, dn_settings, pg_super):
    append_some(dn_ctx, 3)
    e1, e2, _ = audit.show(dn_ctx)
    key, sig = "A" * 43 + "=", "A" * 86 + "=="
    with db.connect(dn_settings.database) as c:
        # Recent entries: refused however the call is made.
        with pytest.raises(psycopg.errors.CheckViolation, match="younger than 90 days"):
            c.execute("SELECT audit_prune(%s, %s, 1, 2, %s, %s)", (2, e2.hash, key, sig))
    backdate_audit(pg_super, [1, 2, 3], days=100, settings=dn_ctx.settings)
    e1, e2, _ = audit.show(dn_ctx)
    with db.connect(dn_settings.database) as c:
        for args, match in [
            ((2, "0" * 64, 1, 2, key, sig), "not entry 2's hash"),
            ((9, e2.hash, 1, 2, key, sig), "does not exist"),
            ((2, e2.hash, 2, 1, key, sig), "not the unbroken start"),
            ((2, e2.hash, 1, 2, "", ""), "audit_anchor_public_key_check"),
        ]:
            with pytest.raises(psycopg.Error, match=match):
                c.execute("SELECT audit_prune(%s, %s, %s, %s, %s, %s)", args)
        assert pg_super.execute("SELECT count(*) FROM audit_log").fetchone()[0] == 3
        assert pg_super.execute("SELECT count(*) FROM audit_anchor").fetchone()[0] == 0
        # The function removes entries only together with the anchor it writes first.
        assert c.execute("SELECT audit_prune(%s, %s, 1, 2, %s, %s)", (2, e2.hash, key, sig)).fetchone()[0] == 2
    anchor = pg_super.execute("SELECT anchor_seq, anchor_hash, pruned_from, pruned_count FROM audit_anchor").fetchall()
    assert anchor == [(2, e2.hash, 1, 2)]
    # That anchor was not signed by dn's key: verify says so.
    assert ("anchor", 2) in problems(dn_ctx)


def _fresh_key_anchor(conn, upto, first=1, signed_at=None):
    """What someone holding only the `dn` credential does: sign an anchor with a key of their own,
    dated as they like (the old audit_prune() took the signing time from its caller)."""
    from datetime import timedelta

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    e = db.row(conn, "SELECT hash, at FROM audit_log WHERE seq = %s", (upto,))
    key = Ed25519PrivateKey.generate()
    claimed = signed_at or e["at"] + timedelta(days=91)  # a date that would pass the 90-day retention check
    a = audit.Anchor(upto, e["hash"], e["at"], first, upto - first + 1, claimed, audit.public_key_b64(key), "")
    return audit.Anchor(**{**a.__dict__, "signature": __import__("base64").b64encode(key.sign(a.message())).decode()})


def test_dn_role_cannot_forge_a_prune_of_entries_younger_than_the_retention(dn_ctx, dn_settings, pg_super):
    # 31..89 days old: inside the promised 90 days.
    append_some(dn_ctx, 4)
    backdate_audit(pg_super, [1, 2, 3], days=60, settings=dn_ctx.settings)
    with db.connect(dn_settings.database) as c:
        a = _fresh_key_anchor(c, 2)
        with pytest.raises(psycopg.errors.UndefinedFunction):  # no signing time from the caller any more
            c.execute("SELECT audit_prune(%s, %s, %s, %s, %s, %s, %s)",
                      (a.anchor_seq, a.anchor_hash, 1, 2, a.signed_at, a.public_key, a.signature))
        with pytest.raises(psycopg.errors.CheckViolation, match="younger than 90 days"):
            c.execute("SELECT audit_prune(%s, %s, 1, 2, %s, %s)", (a.anchor_seq, a.anchor_hash, a.public_key, a.signature))
        # ...and the floor is the database's: the `dn` role cannot lower it.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT audit_set_retention(30)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("UPDATE audit_settings SET retention_days = 30")
    assert pg_super.execute("SELECT count(*) FROM audit_log").fetchone()[0] == 4


@pytest.mark.parametrize("dated", ["as-the-forger-likes", "by-the-database"])
def test_dn_role_prune_under_a_fresh_key_does_not_verify(dn_ctx, dn_settings, dn_cli_env, pg_super, tmp_path, dated):
    append_some(dn_ctx, 4)
    backdate_audit(pg_super, [1, 2], days=100, settings=dn_ctx.settings)
    assert audit.verify(dn_ctx).ok
    with db.connect(dn_settings.database) as c, c.transaction():
        now = c.execute("SELECT now()").fetchone()[0]
        a = _fresh_key_anchor(c, 2, signed_at=now if dated == "by-the-database" else None)
        c.execute("SELECT audit_prune(%s, %s, 1, 2, %s, %s)", (a.anchor_seq, a.anchor_hash, a.public_key, a.signature))
    # The database dated the anchor itself, whatever the forger signed.
    (signed_at,) = pg_super.execute("SELECT signed_at FROM audit_anchor").fetchone()
    assert signed_at == now
    # A machine without this data dir's key file or witness (the daily CI verify) judges by the
    # pinned keys only: the anchor is not signed by one of them.
    r = cli(["audit", "verify", "--no-witness"], {**dn_cli_env, "DN__DATA_DIR": str(tmp_path / "ci")})
    assert r.returncode == ExitCode.POLICY, r.stdout + r.stderr
    assert "TAMPERED anchor" in r.stdout and "audit log intact" not in r.stdout
    assert ("not a pinned anchor key (audit.anchor_keys)" if dated == "by-the-database"
            else "signature does not verify") in r.stdout


def test_verify_fails_closed_without_pinned_keys(dn_ctx, dn_cli_env):
    append_some(dn_ctx, 2)
    r = cli(["audit", "verify"], {**dn_cli_env, "DN__AUDIT__ANCHOR_KEYS": "[]"})
    assert r.returncode == ExitCode.INVALID, r.stdout + r.stderr
    assert "UNVERIFIED unverified" in r.stdout and "audit.anchor_keys is not set" in r.stderr
    assert "dn audit key" in r.stderr and 'anchor_keys = ["ed25519:..."]' in r.stderr


def test_prune_needs_a_pinned_key_before_anything_runs(dn_ctx, dn_cli_env, pg_super, tmp_path):
    append_some(dn_ctx, 2)
    backdate_audit(pg_super, [1], days=100, settings=dn_ctx.settings)
    other = json.loads(cli(["audit", "key", "--json"], {**dn_cli_env, "DN__DATA_DIR": str(tmp_path / "other")}).stdout)
    r = cli(["audit", "prune"], {**dn_cli_env, "DN__AUDIT__ANCHOR_KEYS": json.dumps([other["key"]])})
    assert r.returncode == ExitCode.INVALID and "audit.anchor_keys does not pin this machine's anchor key" in r.stderr
    assert [e.command for e in audit.show(dn_ctx)] == ["tenant update"] * 2  # nothing locked, written or pruned
    r = cli(["audit", "key"], dn_cli_env)
    assert r.returncode == 0 and r.stdout.strip() in dn_ctx.settings.audit.anchor_keys and not r.stderr


def test_db_init_sets_the_configured_retention_as_the_floor(dn_ctx, dn_settings, pg_super):
    append_some(dn_ctx, 3)
    backdate_audit(pg_super, [1, 2], days=100, settings=dn_ctx.settings)
    try:
        db.migrate(dn_settings.database, audit_retention_days=120)
        assert pg_super.execute("SELECT retention_days FROM audit_settings").fetchone()[0] == 120
        e2 = audit.show(dn_ctx)[1]
        with db.connect(dn_settings.database) as c:
            with pytest.raises(psycopg.errors.CheckViolation, match="younger than 120 days"):
                c.execute("SELECT audit_prune(2, %s, 1, 2, %s, %s)", (e2.hash, "A" * 43 + "=", "A" * 86 + "=="))
        strict = dn_settings.model_copy(update={"retention": dn_settings.retention.model_copy(update={"audit_days": 120})})
        with pytest.raises(InvalidInput, match="older_than_days: must be at least retention.audit_days \\(120\\)"):
            audit.prune(Context(environ=dn_ctx.environ, _settings=strict), 100)
    finally:
        db.migrate(dn_settings.database, audit_retention_days=90)
    assert audit.prune(dn_ctx).count == 2


# -- tampering by a superuser ----------------------------------------------------------------------
def _forge_tail(ctx, conn, update_head: bool):
    from dataclasses import replace

    last = audit.show(ctx)[-1]
    forged = replace(last, seq=last.seq + 1, prev_hash=last.hash, command="tenant delete", tenant="victim",
                     at=conn.execute("SELECT clock_timestamp()").fetchone()[0])
    forged = replace(forged, hash=forged.compute_hash())
    vals = [getattr(forged, k) for k in audit._COLUMNS]
    vals[audit._COLUMNS.index("args")] = db.jsonb(forged.args)
    with tampering(conn):
        conn.execute(f"INSERT INTO audit_log ({', '.join(audit._COLUMNS)}) VALUES ({', '.join(['%s'] * len(vals))})", vals)
        if update_head:
            conn.execute("UPDATE audit_head SET seq = %s, hash = %s", (forged.seq, forged.hash))
    return forged


@pytest.mark.parametrize("attack, expected", [
    ("modify", [("modified", 3)]),
    ("delete", [("missing", 3)]),
    ("insert-forged", [("inserted", 6)]),
    ("swap", [("broken-link", 2), ("broken-link", 3), ("broken-link", 4), ("modified", 2), ("modified", 3),
              ("out-of-order", 3)]),
    # both witnesses saw #5: this machine's file and the second region's
    ("delete-tail", [("missing", 4), ("witness", 5), ("witness", 5)]),
    ("delete-tail-and-fix-head", [("witness", 5), ("witness", 5)]),
])
def test_superuser_tampering_is_named(dn_ctx, pg_super, attack, expected):
    append_some(dn_ctx, 5)
    assert audit.verify(dn_ctx).ok  # also records this machine's witness (#5)
    with tampering(pg_super):
        if attack == "modify":
            pg_super.execute("UPDATE audit_log SET outcome = 'ok', exit_code = 0, actor = 'user:nobody' WHERE seq = 3")
        elif attack == "delete":
            pg_super.execute("DELETE FROM audit_log WHERE seq = 3")
        elif attack == "swap":
            pg_super.execute("UPDATE audit_log SET seq = 1000 WHERE seq = 2")
            pg_super.execute("UPDATE audit_log SET seq = 2 WHERE seq = 3")
            pg_super.execute("UPDATE audit_log SET seq = 3 WHERE seq = 1000")
        elif attack == "delete-tail":
            pg_super.execute("DELETE FROM audit_log WHERE seq >= 4")
        elif attack == "delete-tail-and-fix-head":
            pg_super.execute("DELETE FROM audit_log WHERE seq >= 4")
            pg_super.execute("UPDATE audit_head SET seq = 3, hash = (SELECT hash FROM audit_log WHERE seq = 3)")
    if attack == "insert-forged":
        _forge_tail(dn_ctx, pg_super, update_head=False)
    assert problems(dn_ctx) == expected


def test_cli_verify_exits_4_and_names_the_entry(dn_ctx, dn_cli_env, pg_super):
    append_some(dn_ctx, 4)
    r = cli(["audit", "verify"], dn_cli_env)
    assert r.returncode == 0 and "audit log intact" in r.stdout, r.stderr
    with tampering(pg_super):
        pg_super.execute("UPDATE audit_log SET args = '{\"step\": 99}' WHERE seq = 2")
    r = cli(["audit", "verify"], dn_cli_env)
    assert r.returncode == ExitCode.POLICY, r.stderr
    assert "TAMPERED modified" in r.stdout and "#2: contents do not match its hash" in r.stdout
    assert "audit log verification failed: 1 problem(s)" in r.stderr
    r = cli(["audit", "verify", "--json"], dn_cli_env)
    out = json.loads(r.stdout)
    assert r.returncode == 4 and not out["ok"] and out["problems"] == [
        {"kind": "modified", "seq": 2, "detail": "contents do not match its hash (entry modified or forged)"}]


# -- prune and anchors -----------------------------------------------------------------------------
def test_prune_anchors_and_verify_continues_from_the_anchor(dn_ctx, pg_super):
    append_some(dn_ctx, 5)
    backdate_audit(pg_super, [1, 2, 3], days=100, settings=dn_ctx.settings)
    plan = audit.prune(dn_ctx, 90, dry_run=True)
    assert (plan.count, plan.first_seq, plan.last_seq, plan.anchor) == (3, 1, 3, None)
    assert pg_super.execute("SELECT count(*) FROM audit_log").fetchone()[0] == 5
    done = audit.prune(dn_ctx, 90)
    assert (done.count, done.first_seq, done.last_seq) == (3, 1, 3) and done.anchor.signature_valid()
    key = audit.anchor_key_path(dn_ctx.settings)
    assert key.stat().st_mode & 0o777 == 0o600
    assert [e.seq for e in audit.show(dn_ctx)] == [4, 5]
    r = audit.verify(dn_ctx)
    assert r.ok and r.anchor.anchor_seq == 3 and r.first_seq == 4 and r.trusted_keys == 1
    assert r.anchor.public_key in audit.trusted_anchor_keys(dn_ctx.settings)
    # The chain goes on from the anchor and a second prune chains its anchor to the first.
    append_some(dn_ctx, 1)
    backdate_audit(pg_super, [4], days=100, settings=dn_ctx.settings)
    assert audit.prune(dn_ctx, 90).count == 1
    r = audit.verify(dn_ctx)
    assert r.ok and r.anchors == 2 and r.anchor.anchor_seq == 4 and [e.seq for e in audit.show(dn_ctx)] == [5, 6]
    assert audit.prune(dn_ctx, 90).count == 0


@pytest.mark.parametrize("forgery, expected", [
    ("UPDATE audit_anchor SET signature = translate(signature, 'ABCDEFGH', 'BCDEFGHA')", ("anchor", 3)),
    ("UPDATE audit_anchor SET anchor_hash = repeat('1', 64)", ("anchor", 3)),
    ("UPDATE audit_anchor SET anchor_seq = 2, pruned_count = 2", ("anchor", 2)),
    ("DELETE FROM audit_anchor", ("missing", 1)),
])
def test_forged_anchor_is_caught(dn_ctx, pg_super, forgery, expected):
    append_some(dn_ctx, 5)
    backdate_audit(pg_super, [1, 2, 3], days=100, settings=dn_ctx.settings)
    audit.prune(dn_ctx, 90)
    with tampering(pg_super):
        pg_super.execute(forgery)
    assert expected in problems(dn_ctx)


def test_prune_refuses_a_broken_chain(dn_ctx, pg_super):
    append_some(dn_ctx, 3)
    backdate_audit(pg_super, [1, 2, 3], days=100, settings=dn_ctx.settings)
    with tampering(pg_super):
        pg_super.execute("DELETE FROM audit_log WHERE seq = 2")
    with pytest.raises(PolicyViolation, match="refusing to prune.*#2"):
        audit.prune(dn_ctx, 90)
    assert pg_super.execute("SELECT count(*) FROM audit_anchor").fetchone()[0] == 0


def test_cli_prune_is_audited(dn_ctx, dn_cli_env, pg_super):
    append_some(dn_ctx, 4)
    backdate_audit(pg_super, [1, 2], days=100, settings=dn_ctx.settings)
    r = cli(["audit", "prune", "--dry-run"], dn_cli_env)
    assert r.returncode == 0 and "would prune 2 entries #1..#2 older than 90 days" in r.stdout, r.stderr
    r = cli(["audit", "prune"], dn_cli_env)
    assert r.returncode == 0 and "pruned 2 entries #1..#2" in r.stdout and "anchor signed by SHA256:" in r.stdout, r.stderr
    last = audit.show(dn_ctx)[-1]
    assert (last.command, last.outcome, last.args) == ("audit prune", "ok", {
        "older_than_days": 90, "pruned": 2, "first_seq": 1, "last_seq": 2})
    # The CLI signed with the data dir's key, which the configuration pins.
    assert audit.verify(dn_ctx).ok


# -- concurrency -----------------------------------------------------------------------------------
WORKER = """
import sys
from dn import audit, db
from dn.context import Context
ctx = Context()
with db.connect(ctx.settings.database) as conn:
    for i in range(int(sys.argv[1])):
        audit.record(ctx, "bench append", {"worker": sys.argv[2], "i": i}, tenant="t" + sys.argv[2], conn=conn)
"""


def test_concurrent_appends_make_one_unbroken_chain(dn_ctx, dn_cli_env):
    workers, each = 4, 30
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(each), str(w)], env=dn_cli_env, cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for w in range(workers)]
    for p in procs:
        assert p.wait(timeout=180) == 0, p.stderr.read()
    entries = audit.show(dn_ctx)
    assert [e.seq for e in entries] == list(range(1, workers * each + 1))
    assert all(b.prev_hash == a.hash for a, b in zip(entries, entries[1:]))
    assert len({e.pid for e in entries}) == workers
    # Writers interleaved (otherwise nothing was concurrent) and none lost an entry.
    runs = sum(1 for a, b in zip(entries, entries[1:]) if a.pid != b.pid)
    assert runs >= workers
    for w in range(workers):
        assert sorted(e.args["i"] for e in entries if e.args["worker"] == str(w)) == list(range(each))
    assert audit.verify(dn_ctx).ok


# -- show ----------------------------------------------------------------------------------------
def test_show_filters_and_cli_output(dn_ctx, dn_cli_env, pg_super):
    append_some(dn_ctx, 2, tenant="acme")
    append_some(dn_ctx, 1, tenant="beta")
    backdate_audit(pg_super, [1], days=10, settings=dn_ctx.settings)
    assert [e.seq for e in audit.show(dn_ctx, tenant="acme")] == [1, 2]
    r = cli(["audit", "show", "--since", "7d", "--json"], dn_cli_env)
    assert r.returncode == 0, r.stderr
    assert [e["seq"] for e in json.loads(r.stdout)] == [2, 3]
    r = cli(["audit", "show", "--tenant", "beta"], dn_cli_env)
    assert r.returncode == 0 and r.stdout.count("\n") == 1 and "tenant=beta host=test-eu1  ok(0)" in r.stdout
    r = cli(["audit", "show", "--since", "last tuesday"], dn_cli_env)
    assert r.returncode == ExitCode.INVALID and "--since: 'last tuesday' is not a date" in r.stderr

