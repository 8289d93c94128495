"""Batched deletes: each batch is its own short transaction with a lock timeout.

A tenant's 2 million events deleted by one statement hold their row locks (and block every
writer touching them) for as long as the statement runs; in batches of a few thousand rows each
lock lives only as long as its batch. A batch that cannot get a lock within the timeout is
retried a few times, then the run fails naming the table (and a rerun continues where it
stopped: deleted rows stay deleted).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from dn.errors import OperationFailed
from dn.gdpr.sqlgen import Condition, batch_delete_sql, exists_sql, floor_of, ident

if TYPE_CHECKING:
    from dn.db import Connection

BATCH_ROWS = 5000
LOCK_TIMEOUT_MS = 2000
LOCK_RETRIES = 5
LOCK_NOT_AVAILABLE = "55P03"
EMPTY_ROUNDS = 50


@dataclass
class BatchStats:
    table: str
    deleted: int = 0
    batches: int = 0
    longest_ms: float = 0.0  # the longest transaction, the last (empty) one included
    total_ms: float = 0.0
    lock_retries: int = 0
    last_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "deleted": self.deleted, "batches": self.batches,
                "longest_batch_ms": round(self.longest_ms, 1), "total_ms": round(self.total_ms, 1),
                "lock_retries": self.lock_retries}


def delete_in_batches(conn: "Connection", table: str, cond: Condition, *, batch_size: int = BATCH_ROWS,
                      order: str | None = None, prefix: tuple[str, Any] | None = None,
                      lock_timeout_ms: int = LOCK_TIMEOUT_MS,
                      lock_retries: int = LOCK_RETRIES,
                      on_batch: Callable[[BatchStats, int], None] | None = None,
                      sleep: Callable[[float], None] = time.sleep) -> BatchStats:
    """Delete every row of ``table`` matching ``cond``, ``batch_size`` rows per transaction.

    ``order`` names a column indexed together with the condition (e.g. ``id`` of an index on
    ``(tenant_id, id)``): batches then walk the index from where the previous one ended, so each
    costs the same however many rows went before; ``prefix`` = (column, value) is the index's
    leading column and the value ``cond`` fixes it to (``("tenant_id", 42)``). Without ``order``
    each batch finds its rows afresh.
    ``conn`` must be in autocommit mode (each batch opens its own transaction). ``on_batch`` is
    called after each committed batch with the running stats and that batch's row count.
    """
    pcol = prefix[0] if prefix else None
    bound: tuple[Any, ...] = (prefix[1],) if prefix else ()
    first_sql, params = batch_delete_sql(table, cond, batch_size, order, prefix=pcol)
    next_sql = floor_sql = None
    if order is not None:
        next_sql, _ = batch_delete_sql(table, cond, batch_size, order, after=True, prefix=pcol)
        floor = floor_of(_type_of(conn, table, order))
        if floor is not None:
            floor_sql, _ = batch_delete_sql(table, cond, batch_size, order, after=True, prefix=pcol, floor=floor)
    plain_exists, _ = exists_sql(table, cond)
    stats = BatchStats(table)
    failures = empty = skipped = 0
    last: Any = None
    from_bottom = True  # this batch walks from the lowest key (the first one, or after a restart)
    while True:
        started = time.monotonic()
        try:
            with conn.transaction():
                conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout_ms)}ms'")
                if order is not None:
                    # The walk must be an index scan in key order that stops after the batch; the
                    # planner misjudges the row comparison's selectivity and would otherwise read
                    # every remaining row of the tenant (bitmap scan) and sort them, every batch.
                    conn.execute("SET LOCAL enable_bitmapscan = off")
                    conn.execute("SET LOCAL enable_seqscan = off")
                if order is None:
                    n = conn.execute(first_sql, params).rowcount
                elif last is None and floor_sql is None:
                    found, n, top = conn.execute(first_sql, params).fetchone()
                elif last is None:  # from the lowest value of the key's type, through the index
                    found, n, top = conn.execute(floor_sql, (*params, *bound)).fetchone()
                else:
                    found, n, top = conn.execute(next_sql, (*params, *bound, last)).fetchone()
        except Exception as e:  # psycopg errors carry their SQLSTATE
            if getattr(e, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                raise
            failures += 1
            stats.lock_retries += 1
            if failures > lock_retries:
                raise OperationFailed(
                    f"deleting from {table}: rows stayed locked by another session for "
                    f"{lock_retries + 1} attempts of {lock_timeout_ms} ms",
                    hint="find the blocking session (pg_stat_activity, pg_locks) and rerun the same command: "
                         "it continues where it stopped", where="database") from None
            sleep(min(2.0, 0.1 * 2 ** failures))
            continue
        elapsed = (time.monotonic() - started) * 1000
        failures = 0
        stats.last_ms = elapsed
        stats.longest_ms = max(stats.longest_ms, elapsed)
        if order is not None:
            if not found:
                # Rows found but skipped (updated by another session while their batch waited for
                # them) lie behind the position the walk reached: then one more pass from the
                # lowest key. (Without skips there is nothing behind it, and such a pass would
                # only wade through every entry the walk deleted.)
                if from_bottom or not skipped:
                    return stats
                last, from_bottom, skipped = None, True, 0
                continue
            last, from_bottom = top, False
            skipped += found - n
            empty = empty + 1 if n == 0 else 0
        elif n <= 0:
            if not conn.execute(plain_exists, params).fetchone()[0]:
                return stats
            empty += 1
            sleep(0.05)
        else:
            empty = 0
        if empty > EMPTY_ROUNDS:
            raise OperationFailed(f"deleting from {table}: the remaining rows change under every batch",
                                  hint="stop whatever writes them and rerun the same command", where="database")
        if n <= 0:
            continue
        stats.deleted += n
        stats.batches += 1
        stats.total_ms += elapsed
        if on_batch is not None:
            on_batch(stats, n)


def _type_of(conn: "Connection", table: str, col: str) -> str:
    row = conn.execute("SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
                       "WHERE a.attrelid = to_regclass(%s) AND a.attname = %s AND NOT a.attisdropped",
                       (ident(table), col)).fetchone()
    return row[0] if row else ""
