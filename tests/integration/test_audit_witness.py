"""The audit chain's witness in the second region (the sandbox's SFTP region) against a real
PostgreSQL: someone holding the database refills, rewrites or cuts the chain; every verification,
also one on a machine without this data dir's witness file, fails. And the migration that stops
audit_prune() trusting its caller applies to a database made by the previous schema."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from dn import audit, db
from dn.context import Context
from dn.errors import ExitCode
from tests.fixtures.postgres import _wipe, tampering

pytestmark = [pytest.mark.postgres, pytest.mark.sandbox]
ROOT = Path(__file__).resolve().parents[2]
DN = str(ROOT / ".venv" / "bin" / "dn")


@pytest.fixture(autouse=True)
def region(audit_region):
    return audit_region


def cli(args, env):
    return subprocess.run([DN, *args], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)


def append_some(ctx, n):
    for i in range(n):
        with audit.privileged(ctx, "tenant update", {"step": i}, tenant="acme", host="test-eu1"):
            pass


def region_files(settings) -> list[str]:
    from dn.backup.store import Store

    with Store.open(settings.backup, retries=0) as store:
        return store.records(audit.WITNESS_DIR)


def elsewhere(ctx, tmp_path) -> Context:
    """Another machine: same configuration (pinned keys, database, region), but no witness file
    and no anchor key of its own (the daily CI verify, a second operator)."""
    d = tmp_path / "elsewhere"
    d.mkdir(mode=0o700)
    return Context(environ=ctx.environ, _settings=ctx.settings.model_copy(update={"data_dir": d}))


def _rehash_from(conn, first_seq: int, change) -> None:
    """Rewrite entries from ``first_seq`` on with ``change`` and re-hash the chain from there, head
    row included (a superuser with the triggers off)."""
    entries = [audit.Entry.from_row(r) for r in db.rows(conn, "SELECT * FROM audit_log ORDER BY seq")]
    prev = next((e.hash for e in entries if e.seq == first_seq - 1), audit.GENESIS)
    for e in entries:
        if e.seq < first_seq:
            continue
        e2 = replace(change(e), prev_hash=prev)
        e2 = replace(e2, hash=e2.compute_hash())
        conn.execute("UPDATE audit_log SET actor = %s, command = %s, prev_hash = %s, hash = %s WHERE seq = %s",
                     (e2.actor, e2.command, e2.prev_hash, e2.hash, e2.seq))
        prev = e2.hash
    conn.execute("UPDATE audit_head SET seq = (SELECT max(seq) FROM audit_log), hash = %s", (prev,))


def test_clean_verify_adds_one_signed_witness_file_per_head(dn_ctx, tmp_path):
    append_some(dn_ctx, 3)
    r = audit.verify(dn_ctx)
    assert r.ok and r.region_witness is None and r.recorded.seq == 3
    head = audit.show(dn_ctx)[-1]
    assert region_files(dn_ctx.settings) == [f"{3:012d}-{head.hash}.json"]
    assert r.recorded.signature_valid() and r.recorded.public_key in audit.trusted_anchor_keys(dn_ctx.settings)
    # Nothing new: no new file; a machine without the key reads the witness but writes none.
    r = audit.verify(dn_ctx)
    assert r.ok and r.region_witness.seq == 3 and r.recorded is None
    append_some(dn_ctx, 1)
    other = audit.verify(elsewhere(dn_ctx, tmp_path))
    assert other.ok and other.region_witness.seq == 3 and other.witness is None and other.recorded is None
    assert len(region_files(dn_ctx.settings)) == 1
    assert audit.verify(dn_ctx).recorded.seq == 4 and len(region_files(dn_ctx.settings)) == 2


@pytest.mark.parametrize("attack", ["refill-rehashed", "rewrite-tail", "delete-tail", "delete-tail-fix-head"])
def test_database_holder_cannot_make_the_chain_verify_without_the_local_file(dn_ctx, dn_cli_env, pg_super, tmp_path,
                                                                            attack):
    append_some(dn_ctx, 5)
    assert audit.verify(dn_ctx).recorded.seq == 5
    with tampering(pg_super):
        if attack == "refill-rehashed":
            _rehash_from(pg_super, 1, lambda e: replace(e, actor="user:nobody"))
        elif attack == "rewrite-tail":
            _rehash_from(pg_super, 4, lambda e: replace(e, command="nothing to see"))
        elif attack == "delete-tail":
            pg_super.execute("DELETE FROM audit_log WHERE seq >= 4")
        else:
            pg_super.execute("DELETE FROM audit_log WHERE seq >= 4")
            pg_super.execute("UPDATE audit_head SET seq = 3, hash = (SELECT hash FROM audit_log WHERE seq = 3)")
    # The database alone is self-consistent after the rewrites: only the witness tells.
    local = audit.witness_path(dn_ctx.settings)
    local.unlink()
    r = audit.verify(elsewhere(dn_ctx, tmp_path))
    assert not r.ok and ("witness", 5) in [(p.kind, p.seq) for p in r.problems], r.problems
    assert any("the second region's witness" in p.detail for p in r.problems)
    # The CLI with --no-witness, on this machine: the region's witness still counts.
    out = cli(["audit", "verify", "--no-witness"], dn_cli_env)
    assert out.returncode == ExitCode.POLICY, out.stdout + out.stderr
    assert "TAMPERED witness" in out.stdout and "second region's witness" in out.stdout
    assert not local.exists()
    # Nothing was witnessed over the rewritten chain.
    assert len(region_files(dn_ctx.settings)) == 1


def test_region_witness_is_never_replaced_and_a_forged_one_is_named(dn_ctx, pg_super):
    from dn.backup.store import Store

    append_some(dn_ctx, 2)
    w = audit.verify(dn_ctx).recorded
    key = audit.anchor_key(dn_ctx.settings, create=False)
    with Store.open(dn_ctx.settings.backup, retries=0) as store:
        before = store.read_record(audit.WITNESS_DIR, w.name)
        assert audit.record_region_witness(store, key, w.seq, w.hash) is None  # same name: not written again
        assert store.read_record(audit.WITNESS_DIR, w.name) == before
        # The rename a record is put in place with refuses an existing target (the region's sshd).
        tmp = f"{store.root}/{audit.WITNESS_DIR}/.probe.part"
        with store.sftp.open(tmp, "wb") as f:
            f.write(b"{}")
        with pytest.raises(OSError):
            store.sftp.rename(tmp, f"{store.root}/{audit.WITNESS_DIR}/{w.name}")
        store.sftp.remove(tmp)
        assert store.read_record(audit.WITNESS_DIR, w.name) == before
        # A newer "witness" written with someone else's key (or edited) is a problem, not a pass.
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        entries = audit.show(dn_ctx)
        fake = audit.record_region_witness(store, Ed25519PrivateKey.generate(), 9, entries[-1].hash)
        assert fake is not None
    r = audit.verify(dn_ctx)
    assert not r.ok and r.region_witness == w
    (p,) = r.problems
    assert (p.kind, p.seq) == ("witness", 9) and "not a pinned key (audit.anchor_keys)" in p.detail


def test_verify_without_a_second_region_fails_closed(dn_ctx, dn_cli_env):
    append_some(dn_ctx, 1)
    bare = Context(environ=dn_ctx.environ, _settings=dn_ctx.settings.model_copy(update={"backup": None}))
    r = audit.verify(bare)
    assert not r.ok and [p.kind for p in r.problems] == ["unverified"]
    assert "backup is not configured" in r.problems[0].detail


def test_unreachable_region_is_not_a_pass(dn_ctx, dn_cli_env):
    append_some(dn_ctx, 1)
    r = cli(["audit", "verify"], {**dn_cli_env, "DN__BACKUP__PORT": "1"})
    assert r.returncode == ExitCode.UNREACHABLE, r.stdout + r.stderr
    assert "audit log intact" not in r.stdout


def test_dn_verify_witness_claim(dn_ctx, tmp_path):
    from dn.verify import auditlog
    from dn.verify.core import Status
    from dn.verify.probe import Probe

    append_some(dn_ctx, 2)
    with Probe(dn_ctx.settings, environ=dn_ctx.environ) as probe:
        assert auditlog.check_chain(probe)[0] is Status.PASS
        status, ev = auditlog.check_witness(probe)
        assert status is Status.PASS and ev[0].startswith("newest witness #2 of ")
    # Seen from CI (no key of its own) after more entries and two days: the tail is unwitnessed.
    append_some(dn_ctx, 1)
    from datetime import datetime, timedelta, timezone

    later = datetime.now(timezone.utc) + timedelta(days=2)
    with Probe(elsewhere(dn_ctx, tmp_path).settings, environ=dn_ctx.environ) as probe:
        status, ev = auditlog.check_witness(probe, now=later)
        assert status is Status.FAIL and "older than 36 h" in ev[0] and "chain at #3" in ev[0]
    bare = dn_ctx.settings.model_copy(update={"audit": dn_ctx.settings.audit.model_copy(update={"anchor_keys": []})})
    with Probe(bare, environ=dn_ctx.environ) as probe:
        assert auditlog.check_chain(probe)[0] is Status.FAIL
        status, ev = auditlog.check_witness(probe)
        assert status is Status.FAIL and "audit.anchor_keys is not set" in ev[0]


def test_a_restore_is_accepted_only_explicitly_signed_and_audited(dn_ctx, dn_cli_env, pg_super):
    append_some(dn_ctx, 5)
    assert audit.verify(dn_ctx).recorded.seq == 5

    def restore_to(seq):  # what restoring a backup taken at #seq leaves: the chain up to it
        with tampering(pg_super):
            pg_super.execute("DELETE FROM audit_log WHERE seq > %s", (seq,))
            pg_super.execute("UPDATE audit_head SET seq = %s, hash = (SELECT hash FROM audit_log WHERE seq = %s)",
                             (seq, seq))

    restore_to(3)
    out = cli(["audit", "verify", "--no-witness"], dn_cli_env)
    assert out.returncode == ExitCode.POLICY and "TAMPERED witness" in out.stdout
    # Refused while anything else is wrong with the chain.
    with tampering(pg_super):
        pg_super.execute("UPDATE audit_log SET command = 'x' WHERE seq = 2")
    out = cli(["audit", "accept-restore"], dn_cli_env)
    assert out.returncode == ExitCode.POLICY and "other problems" in out.stderr, out.stdout + out.stderr
    with tampering(pg_super):
        pg_super.execute("UPDATE audit_log SET command = 'tenant update' WHERE seq = 2")
    # (the refused attempt is on record: #4)
    out = cli(["audit", "accept-restore"], dn_cli_env)
    assert out.returncode == 0 and "restored to #4; entries #5..#5 were lost" in out.stdout, out.stdout + out.stderr
    head = audit.show(dn_ctx)
    assert any(n.startswith(f"restore-{4:012d}-") for n in region_files(dn_ctx.settings))
    assert head[-2].command == "audit accept-restore" and head[-2].outcome == "failed"
    assert (head[-1].command, head[-1].args) == ("audit accept-restore", {"restored_to": 4, "lost_up_to": 5})
    r = audit.verify(dn_ctx)
    assert r.ok and r.region_witness.lost_seq == 5 and r.recorded.seq == 5, r.problems
    # The chain goes on (#5 is a new entry now); a later cut is caught again.
    append_some(dn_ctx, 1)
    assert audit.verify(dn_ctx).recorded.seq == 6
    restore_to(5)
    audit.witness_path(dn_ctx.settings).unlink()
    assert ("witness", 6) in [(p.kind, p.seq) for p in audit.verify(dn_ctx).problems]


def test_retention_check_judges_an_anchor_by_the_database_clock(dn_ctx, pg_super):
    from datetime import timedelta

    from dn.verify import auditlog
    from dn.verify.core import Status
    from dn.verify.probe import Probe

    # What the old audit_prune() let the `dn` role write: 60-day-old entries pruned, the anchor's
    # signing time claimed 91 days after them. created_at is the database's own time of the prune.
    append_some(dn_ctx, 3)
    e1 = audit.show(dn_ctx)[0]
    with tampering(pg_super):
        pg_super.execute("INSERT INTO audit_anchor (anchor_seq, anchor_hash, anchor_at, pruned_from, pruned_count,"
                         " signed_at, public_key, signature) VALUES (1, %s, %s, 1, 1, %s, %s, %s)",
                         (e1.hash, e1.at - timedelta(days=60), e1.at + timedelta(days=31), "A" * 43 + "=", "A" * 86 + "=="))
        pg_super.execute("DELETE FROM audit_log WHERE seq = 1")
    with Probe(dn_ctx.settings, environ=dn_ctx.environ) as probe:
        status, ev = auditlog.check_retention(probe)
    assert status is Status.FAIL and any("newest pruned entry 60 days old: younger than 90 days" in x for x in ev), ev


# -- the migration, on a database made by the previous schema -------------------------------------
def test_migration_applies_to_a_database_of_the_previous_schema(pg_cluster, pg_database, dn_settings, pg_super,
                                                               tmp_path):
    from psycopg import sql

    from dn.config import DatabaseConfig

    name = f"dn_prev_{os.getpid()}"
    with db.connect_dsn(pg_cluster.dsn("postgres", "postgres"), pg_cluster.passfile) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        c.execute(sql.SQL("CREATE DATABASE {} OWNER dn_owner").format(sql.Identifier(name)))
        c.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO dn").format(sql.Identifier(name)))
    try:
        cfg = DatabaseConfig(dsn=pg_cluster.dsn("dn", name), admin_dsn=pg_cluster.dsn("dn_owner", name),
                             passfile=pg_cluster.passfile)
        previous = tmp_path / "schema"
        previous.mkdir()
        for m in db.migrations():
            if m.version < 5:
                shutil.copy(db.SCHEMA_DIR / m.filename, previous / m.filename)
        assert [m.version for m in db.migrate(cfg, schema_dir=previous)] == [1, 2, 3, 4]
        settings = dn_settings.model_copy(update={"database": cfg})
        ctx = Context(environ={}, _settings=settings)
        for i in range(3):
            audit.record(ctx, "tenant update", {"i": i})
        # An anchor written the old way (the caller's signing time), by dn's pinned key.
        with db.connect_dsn(pg_cluster.dsn("postgres", name), pg_cluster.passfile) as su, tampering(su):
            su.execute("UPDATE audit_log SET at = at - interval '100 days'")
            su.execute("UPDATE audit_head SET at = (SELECT max(at) FROM audit_log)")
            entries = [audit.Entry.from_row(r) for r in db.rows(su, "SELECT * FROM audit_log ORDER BY seq")]
            prev = audit.GENESIS
            for e in entries:
                e2 = replace(e, prev_hash=prev)
                e2 = replace(e2, hash=e2.compute_hash())
                su.execute("UPDATE audit_log SET prev_hash = %s, hash = %s WHERE seq = %s", (e2.prev_hash, e2.hash, e.seq))
                prev = e2.hash
            su.execute("UPDATE audit_head SET hash = %s", (prev,))
        audit.witness_path(settings).unlink()  # the backdated chain is what this machine has always seen
        key = audit.anchor_key(settings, create=False)
        with db.connect(cfg) as c, c.transaction():
            e1 = db.row(c, "SELECT hash, at FROM audit_log WHERE seq = 1")
            now = c.execute("SELECT clock_timestamp()").fetchone()[0]
            a = audit.Anchor(1, e1["hash"], e1["at"], 1, 1, now, audit.public_key_b64(key), "")
            a = audit.Anchor(**{**a.__dict__, "signature": __import__("base64").b64encode(key.sign(a.message())).decode()})
            c.execute("SELECT audit_prune(%s, %s, %s, %s, %s, %s, %s)",
                      (1, a.anchor_hash, 1, 1, a.signed_at, a.public_key, a.signature))
        # Now the new migration, as `dn db init` runs it.
        assert [m.version for m in db.migrate(cfg, audit_retention_days=90)] == [m.version for m in db.migrations()
                                                                                   if m.version >= 5]
        with db.connect_dsn(pg_cluster.dsn("postgres", name), pg_cluster.passfile) as su:
            assert su.execute("SELECT retention_days FROM audit_settings").fetchone()[0] == 90
            assert su.execute("SELECT count(*) FROM pg_proc WHERE proname = 'audit_prune'").fetchone()[0] == 1
        r = audit.verify(ctx)
        assert r.ok and r.anchors == 1 and r.first_seq == 2, r.problems
        assert audit.prune(ctx).count == 2 and audit.verify(ctx).ok
    finally:
        with db.connect_dsn(pg_cluster.dsn("postgres", "postgres"), pg_cluster.passfile) as c:
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
