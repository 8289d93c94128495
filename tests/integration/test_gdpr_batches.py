"""Batched deletes against the real database: a row updated by another session while a batch
waits for it is not left behind; a row lock held longer than the lock timeout fails the run
with a clear message after its retries."""
from __future__ import annotations

import threading
import time

import pytest

from dn.errors import OperationFailed
from dn.gdpr.batches import delete_in_batches
from dn.gdpr.sqlgen import Condition

pytestmark = [pytest.mark.postgres]


def _setup(conn, n: int) -> int:
    tid = conn.execute("INSERT INTO tenants (slug, display_name, host) VALUES ('batch-t', 'b', 'test-eu1') "
                       "RETURNING id").fetchone()[0]
    conn.execute("INSERT INTO events (tenant_id, event_name) SELECT %s, 'e' FROM generate_series(1, %s)", (tid, n))
    return tid


def _wait_blocked(conn, app: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'",
                        (app,)).fetchone()[0]:
            return
        time.sleep(0.02)
    raise AssertionError("the batch never waited for the row lock")


@pytest.mark.parametrize("order, rows", [(None, 1), ("id", 1), ("id", 30)])
def test_a_row_updated_while_its_batch_waits_is_deleted_by_a_later_batch(dn_settings, order, rows):
    """With an ``order`` key the updated row (the first one) lies behind the position the batches
    reached: the final look from the start finds it."""
    from dn import db

    with db.connect(dn_settings.database) as conn, db.connect(dn_settings.database) as other, \
            db.connect(dn_settings.database, application_name="dn batch test") as work:
        tid = _setup(conn, rows)
        other.execute("BEGIN")
        other.execute("UPDATE events SET event_name = 'touched' WHERE id = (SELECT min(id) FROM events "
                      "WHERE tenant_id = %s)", (tid,))
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("stats", delete_in_batches(
            work, "events", Condition('"tenant_id" = %s', (tid,)), batch_size=10, order=order,
            prefix=("tenant_id", tid) if order else None)))
        t.start()
        _wait_blocked(conn, "dn batch test")
        other.execute("COMMIT")
        t.join(30)
        assert result["stats"].deleted == rows
        assert conn.execute("SELECT count(*) FROM events WHERE tenant_id = %s", (tid,)).fetchone()[0] == 0


def test_ordered_batches_walk_the_index_in_order(dn_settings):
    from dn import db

    with db.connect(dn_settings.database) as conn:
        tid = _setup(conn, 95)
        other = conn.execute("INSERT INTO tenants (slug, display_name, host) VALUES ('batch-o', 'o', 'test-eu1') "
                             "RETURNING id").fetchone()[0]
        conn.execute("INSERT INTO events (tenant_id, event_name) SELECT %s, 'keep' FROM generate_series(1, 50)", (other,))
        ids = [r[0] for r in conn.execute("SELECT id FROM events WHERE tenant_id = %s ORDER BY id", (tid,)).fetchall()]
        seen = []

        def on_batch(stats, n):
            left = conn.execute("SELECT min(id) FROM events WHERE tenant_id = %s", (tid,)).fetchone()[0]
            seen.append((n, left))

        stats = delete_in_batches(conn, "events", Condition('"tenant_id" = %s', (tid,)), batch_size=20, order="id",
                                  prefix=("tenant_id", tid), on_batch=on_batch)
        assert (stats.deleted, stats.batches) == (95, 5)
        assert seen == [(20, ids[20]), (20, ids[40]), (20, ids[60]), (20, ids[80]), (15, None)]
        assert conn.execute("SELECT count(*) FROM events WHERE tenant_id = %s", (other,)).fetchone()[0] == 50


def test_a_lock_held_past_the_timeout_fails_after_retries(dn_settings):
    from dn import db

    with db.connect(dn_settings.database) as conn, db.connect(dn_settings.database) as other, \
            db.connect(dn_settings.database) as work:
        tid = _setup(conn, 20)
        other.execute("BEGIN")
        other.execute("SELECT * FROM events WHERE tenant_id = %s FOR UPDATE", (tid,))
        waits = []
        try:
            with pytest.raises(OperationFailed, match="rows stayed locked by another session for 3 attempts of 100 ms"):
                delete_in_batches(work, "events", Condition('"tenant_id" = %s', (tid,)), batch_size=5,
                                  lock_timeout_ms=100, lock_retries=2, sleep=waits.append)
        finally:
            other.execute("ROLLBACK")
        assert len(waits) == 2
        stats = delete_in_batches(work, "events", Condition('"tenant_id" = %s', (tid,)), batch_size=5)
        assert (stats.deleted, stats.batches) == (20, 4)
