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
from dn.gdpr.sqlgen import Condition, batch_delete_sql, ident

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
    longest_ms: float = 0.0
    total_ms: float = 0.0
    lock_retries: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "deleted": self.deleted, "batches": self.batches,
                "longest_batch_ms": round(self.longest_ms, 1), "total_ms": round(self.total_ms, 1),
                "lock_retries": self.lock_retries}


def delete_in_batches(conn: "Connection", table: str, cond: Condition, *, batch_size: int = BATCH_ROWS,
                      order: str | None = None, lock_timeout_ms: int = LOCK_TIMEOUT_MS,
                      lock_retries: int = LOCK_RETRIES,
                      on_batch: Callable[[BatchStats, int], None] | None = None,
                      sleep: Callable[[float], None] = time.sleep) -> BatchStats:
    """Delete every row of ``table`` matching ``cond``, ``batch_size`` rows per transaction.

    ``order`` names a column indexed together with the condition (e.g. ``id`` of an index on
    ``(tenant_id, id)``): batches then walk the index from where the previous one ended, so each
    costs the same however many rows went before; without it each batch finds its rows afresh.
    ``conn`` must be in autocommit mode (each batch opens its own transaction). ``on_batch`` is
    called after each committed batch with the running stats and that batch's row count.
    """
    first_sql, params = batch_delete_sql(table, cond, batch_size, order)
    next_sql, _ = batch_delete_sql(table, cond, batch_size, order, after=True) if order else (first_sql, None)
    exists_sql = f"SELECT EXISTS (SELECT 1 FROM {ident(table)} WHERE {cond.sql})"
    stats = BatchStats(table)
    failures = empty = 0
    last: Any = None
    while True:
        started = time.monotonic()
        try:
            with conn.transaction():
                conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout_ms)}ms'")
                if order is None:
                    n = conn.execute(first_sql, params).rowcount
                else:
                    sql, args = (first_sql, params) if last is None else (next_sql, (*params, last))
                    n, top = conn.execute(sql, args).fetchone()
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
        if n <= 0:
            # A row updated by another session while its batch waited for it keeps its old ctid
            # in that batch and is skipped (and may lie behind the index position reached): look
            # once more from the start before calling the table done.
            if not conn.execute(exists_sql, params).fetchone()[0]:
                return stats
            empty += 1
            if empty > EMPTY_ROUNDS:
                raise OperationFailed(f"deleting from {table}: the remaining rows change under every batch",
                                      hint="stop whatever writes them and rerun the same command", where="database")
            if last is None:
                sleep(0.05)
            last = None
            continue
        empty = 0
        if order is not None:
            last = top
        stats.deleted += n
        stats.batches += 1
        stats.total_ms += elapsed
        stats.longest_ms = max(stats.longest_ms, elapsed)
        if on_batch is not None:
            on_batch(stats, n)
