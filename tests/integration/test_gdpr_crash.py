"""A deletion killed at every point (before each step acts, after it acted but before the journal
says so, and in the middle of the batched deletes) and then resumed with the same command ends
in the same final state, repeating only the interrupted step.

The crash is real: the deletion runs in a forked process that ends with os._exit at the chosen
progress event — no cleanup, no audit entry, its database session and lock die with it.
"""
from __future__ import annotations

import multiprocessing
import os

import pytest

from dn.gdpr import certificate, workflow
from dn.gdpr.plan import STEPS
from tests.integration.test_gdpr_setup import (
    add_request,
    add_tenant,
    billing_marker,
    gdpr_env,  # noqa: F401 (fixture)
    markers,
    scan,
    snapshot,
)

pytestmark = [pytest.mark.postgres, pytest.mark.sandbox]

CRASHED = 77
POINTS = [(s, "start") for s in STEPS] + [(s, "result") for s in STEPS] + [("rows", "progress")]


def _child(ctx, slug: str, rid: int, point: tuple[str, str]) -> None:
    def on_event(step, phase, detail):
        if (step, phase) == point:
            os._exit(CRASHED)

    try:
        workflow.delete(ctx, slug, rid, on_event=on_event, batch_size=40)
    except BaseException:
        os._exit(3)
    os._exit(0)


@pytest.mark.parametrize("point", POINTS, ids=[f"{s}-{p}" for s, p in POINTS])
def test_crash_then_resume_ends_in_the_same_state(gdpr_env, point):
    from dn import audit, db
    from dn.backup import keys, run
    from dn.gdpr.datamap import load

    env = gdpr_env
    with env.connect() as conn:
        ids = {s: add_tenant(conn, s, env.environ, events=150, hours=12, invoices=2)
               for s in ("crash-one", "crash-two", "crash-three")}
        target = ids["crash-two"]
        rid = add_request(conn, target)
        others = snapshot(conn, exclude_tenant=target)
        expected_before = workflow.tenant_counts(conn, load(), workflow._tenant(conn, "crash-two"))
    if point[0] in ("backup-keys", "rows"):
        run.run_backup(env.settings, env.environ, tenant="crash-two")

    proc = multiprocessing.get_context("fork").Process(target=_child, args=(env.ctx, "crash-two", rid, point))
    proc.start()
    proc.join(300)
    assert proc.exitcode == CRASHED, f"the deletion did not reach {point} (exit {proc.exitcode})"
    with env.connect() as conn:
        steps = {r[0]: (r[1], r[2]) for r in conn.execute(
            "SELECT step, state, attempts FROM gdpr_steps WHERE request_id = %s", (rid,)).fetchall()}
        assert steps[point[0]] == ("started", 1), steps
        assert conn.execute("SELECT finished_at FROM gdpr_runs WHERE request_id = %s", (rid,)).fetchone() == (None,)
        stale = conn.execute("SELECT command FROM op_locks WHERE resource = 'tenant:crash-two'").fetchall()
        assert stale == [("gdpr delete",)]  # the dead run's lock row stays behind

    out = workflow.delete(env.ctx, "crash-two", rid)  # the same command resumes

    cert = out.certificate
    assert certificate.check(cert) == []
    attempts = {s["step"]: s["attempts"] for s in cert["steps"]}
    # the interrupted step ran again, once; no step that was recorded done ran again
    assert attempts == {s: (2 if s == point[0] else 1) for s in STEPS if s != "certificate"}
    journal = {"deletion_requests", "gdpr_runs", "gdpr_steps", "audit_log"}
    assert {t: c["before"] for t, c in cert["counts"].items() if t not in journal} == \
        {t: n for t, n in expected_before.items() if t not in journal}
    for t, c in cert["counts"].items():
        if c["action"] == "deleted":
            assert c["after"] == 0, t
    with env.connect() as conn:
        for m in markers("crash-two"):
            assert scan(conn, m) == {}, m
        assert scan(conn, billing_marker("crash-two")) == {"invoices": 2}
        assert snapshot(conn, exclude_tenant=target) == others
        assert conn.execute("SELECT status FROM tenants WHERE id = %s", (target,)).fetchone() == ("deleted",)
        assert conn.execute("SELECT status FROM deletion_requests WHERE id = %s", (rid,)).fetchone() == ("done",)
        assert conn.execute("SELECT count(*) FROM op_locks").fetchone()[0] == 0
    ks = keys.keystore(env.settings, env.environ)
    assert ks.is_destroyed("tenant-crash-two") and ks.key_ids("tenant-crash-two") == []
    # taking over the dead run's lock is itself on record: whose it was and why it is dead
    taken = [e for e in audit.show(env.ctx, tenant="crash-two") if e.command == "lock takeover"]
    assert len(taken) == 1 and taken[0].args["resource"] == "tenant:crash-two"
    assert taken[0].args["holder"]["command"] == "gdpr delete" and taken[0].args["taken_by"] == "gdpr delete"
    assert f"pid {proc.pid} is gone" in taken[0].args["reason"]
    # the stack step states that no copy of the stack's state is left
    stack = cert["stack"]["state"]
    assert stack["checked"] and stack["remaining"] == [] and stack["stack"] == "crash-two"
    with db.connect(env.settings.database) as conn:
        assert conn.execute("SELECT count(*) FROM gdpr_runs WHERE finished_at IS NOT NULL").fetchone()[0] == 1
