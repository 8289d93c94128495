"""Deleting a tenant with 2 million tracking events: dn's batched deletes vs one plain DELETE.

Runs against a scratch database ``dn_bench_gdpr_<pid>`` on the tests' PostgreSQL cluster
(``/srv/dn-test-pg``, port 54330; started if needed, as root), migrated with dn's own code and
dropped afterwards.

    .venv/bin/python bench/gdpr_delete.py [--events 2000000] [--batch 5000]

Two tenants get the same data (``--events`` events each, with IPs, user agents, cookie ids and
JSON payloads, plus users, API keys, settings, workspaces, hourly statistics and invoices) and a
third tenant gets a tenth of it as the bystander. Then, in the same run:

- tenant A is deleted the way `dn gdpr delete` deletes rows (its "rows" step: every table of the
  data map in deletion order, ``delete_in_batches``, each batch its own transaction with a lock
  timeout);
- tenant B is deleted with one ``DELETE FROM events WHERE tenant_id = B`` (and the other tables).

Measured: total time of each; the longest time a transaction held its lock on ``events``, from
PostgreSQL: a second session samples ``pg_locks`` every 2 ms and records, per virtual transaction of
the deleting backend, when its RowExclusiveLock on ``events`` was first and last seen (the row
locks of a DELETE live exactly as long as that transaction); and the client-side duration of the
longest batch transaction (BEGIN to COMMIT). Also how long another session waited for a SHARE
lock on events (as CREATE INDEX takes) while each deletion ran, tried every 100 ms.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EVENTS_SQL = """
INSERT INTO events (tenant_id, occurred_at, event_name, client_ip, user_agent, cookie_id, payload)
SELECT %(t)s, now() - (e || ' seconds')::interval / 10,
       (ARRAY['page_view', 'add_to_cart', 'begin_checkout', 'purchase'])[1 + e %% 4],
       ('10.' || (e %% 250) || '.' || (%(t)s %% 250) || '.' || (1 + e %% 200))::inet,
       'Mozilla/5.0 (X11; Linux x86_64; rv:' || (100 + e %% 30) || '.0) Gecko/20100101 Firefox/' || (100 + e %% 30),
       md5(%(t)s || 'cookie' || (e %% 9973)),
       jsonb_build_object('value', round((e %% 500)::numeric * 1.37, 2), 'currency', 'CZK',
                          'items', jsonb_build_array(jsonb_build_object('sku', 'SKU-' || (e %% 50), 'qty', 1 + e %% 3)))
FROM generate_series(%(lo)s::int, %(hi)s::int) e
"""


class LockSampler(threading.Thread):
    """Samples pg_locks for the deleting backend's lock on events; per virtual transaction it
    keeps the first and last time it was seen."""

    def __init__(self, conn, pid: int, interval: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.conn, self.pid, self.interval = conn, pid, interval
        self.seen: dict[str, list[float]] = {}  # "vxid mode" -> [first seen, last seen]
        self.queries: dict[str, str] = {}
        self.samples = 0
        self.stop = threading.Event()

    def run(self) -> None:
        q = ("SELECT l.virtualtransaction || ' ' || l.mode, a.query FROM pg_locks l "
             "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'relation' AND l.granted "
             "AND l.relation = 'events'::regclass AND l.pid = %s")
        while not self.stop.is_set():
            now = time.monotonic()
            for vxid, query in self.conn.execute(q, (self.pid,)).fetchall():
                if vxid.split(" ")[0].endswith("/0"):
                    continue  # caught between transactions (local xid 0): not a transaction's lock
                span = self.seen.setdefault(vxid, [now, now])
                span[1] = now
                self.queries[vxid] = query
            self.samples += 1
            time.sleep(self.interval)

    def longest_ms(self, mode: str = "") -> float:
        """The longest hold of a lock in ``mode`` (any mode: "")."""
        return max(((b - a) * 1000 for k, (a, b) in self.seen.items() if k.endswith(mode)), default=0.0)

    def longest_query(self) -> str:
        k = max(self.seen, key=lambda k: self.seen[k][1] - self.seen[k][0])
        return f"{k}: {self.queries.get(k, '')[:300]}"

    def transactions(self, mode: str = "RowExclusiveLock") -> int:
        return sum(1 for k in self.seen if k.endswith(mode))


class Bystander(threading.Thread):
    """Every 100 ms, take a SHARE lock on events and release it at once (what CREATE INDEX or a
    foreign-key validation needs): it waits for whichever deleting transaction holds the table's
    RowExclusiveLock, so its longest wait is the longest lock hold as another session feels it."""

    def __init__(self, conn) -> None:
        super().__init__(daemon=True)
        self.conn = conn
        self.waits: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                with self.conn.transaction():
                    self.conn.execute("SET LOCAL lock_timeout = '60s'")
                    self.conn.execute("LOCK TABLE events IN SHARE MODE")
            except Exception:  # a lock timeout counts as a 60 s wait
                pass
            self.waits.append(time.monotonic() - t0)
            time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=2_000_000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--keep", action="store_true", help="keep the scratch database")
    ap.add_argument("--no-autovacuum", action="store_true",
                    help="switch autovacuum off for events (it competes for the table's locks while the deletion runs)")
    args = ap.parse_args()

    from psycopg import sql

    from dn import db
    from dn.config import DatabaseConfig
    from dn.gdpr import datamap, plan
    from dn.gdpr.batches import delete_in_batches
    from dn.gdpr.sqlgen import tenant_condition
    from dn.pgcluster import Cluster

    root = Path(os.environ.get("DN_TEST_PG_ROOT", "/srv/dn-test-pg"))
    cluster = Cluster(root, int(os.environ.get("DN_TEST_PG_PORT", "54330")), root.parent / f"{root.name}.pgpass").ensure()
    name = f"dn_bench_gdpr_{os.getpid()}"
    with db.connect_dsn(cluster.dsn("postgres", "postgres"), cluster.passfile) as c:
        c.execute(sql.SQL("CREATE DATABASE {} OWNER dn_owner").format(sql.Identifier(name)))
        c.execute(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO dn").format(sql.Identifier(name)))
    cfg = DatabaseConfig(dsn=cluster.dsn("dn", name), admin_dsn=cluster.dsn("dn_owner", name), passfile=cluster.passfile)
    try:
        db.migrate(cfg, bootstrap_dsn=cluster.dsn("postgres", name))
        dm = datamap.load()
        with db.connect(cfg) as conn:
            t0 = time.monotonic()
            ids = {}
            for slug, n in (("bench-a", args.events), ("bench-b", args.events), ("bench-c", args.events // 10)):
                tid = conn.execute("INSERT INTO tenants (slug, display_name, host) VALUES (%s, %s, 'eu1') RETURNING id",
                                   (slug, slug)).fetchone()[0]
                ids[slug] = tid
                for lo in range(1, n + 1, 500_000):
                    conn.execute(EVENTS_SQL, {"t": tid, "lo": lo, "hi": min(n, lo + 499_999)})
                conn.execute("INSERT INTO users (tenant_id, email, password_hash) SELECT %s, 'u' || g || '@x.example', "
                             "'pbkdf2_sha256$1$a$b' FROM generate_series(1, 20) g", (tid,))
                conn.execute("INSERT INTO hourly_stats (tenant_id, hour) SELECT %s, date_trunc('hour', now()) - "
                             "g * interval '1 hour' FROM generate_series(1, 17520) g", (tid,))
                conn.execute("INSERT INTO tenant_settings (tenant_id, key, value) VALUES (%s, 'a.b', '1')", (tid,))
            conn.execute("ANALYZE")
            if args.no_autovacuum:
                with db.connect_dsn(cluster.dsn("postgres", name), cluster.passfile) as su:
                    su.execute("ALTER TABLE events SET (autovacuum_enabled = off)")
            size = conn.execute("SELECT pg_size_pretty(pg_total_relation_size('events'))").fetchone()[0]
            print(f"generated {2 * args.events + args.events // 10} events ({size} with indexes) "
                  f"in {time.monotonic() - t0:.0f} s", flush=True)

        results = {}
        spread = ""
        for slug, how in (("bench-a", "dn batched"), ("bench-b", "plain DELETE")):
            tid = ids[slug]
            with db.connect(cfg, application_name="bench deleter") as work, \
                    db.connect_dsn(cluster.dsn("postgres", name), cluster.passfile) as watch, \
                    db.connect(cfg, application_name="bench bystander") as by:
                sampler = LockSampler(watch, work.info.backend_pid)
                bystander = Bystander(by)
                sampler.start()
                bystander.start()
                t0 = time.monotonic()
                longest_batch = 0.0
                batches = 0
                if how == "dn batched":
                    for table in plan.deletion_order(dm, datamap.read_catalog(work).foreign_keys):
                        times = []
                        st = delete_in_batches(work, table, tenant_condition(dm, dm.tables[table], tid, slug),
                                               batch_size=args.batch, order=dm.tables[table].batch_key,
                                               prefix=(dm.tables[table].tenant.column, tid)
                                               if dm.tables[table].batch_key else None,
                                               on_batch=lambda s, n, times=times: times.append(s.last_ms))
                        if table == "events":
                            longest_batch, batches = st.longest_ms, st.batches
                            times.sort()
                            spread = (f"batch transactions on events: median {statistics.median(times):.0f} ms, "
                                      f"p95 {times[int(len(times) * 0.95) - 1]:.0f} ms, p99 "
                                      f"{times[int(len(times) * 0.99) - 1]:.0f} ms, max {times[-1]:.0f} ms")
                else:
                    with work.transaction():
                        t1 = time.monotonic()
                        work.execute("DELETE FROM events WHERE tenant_id = %s", (tid,))
                        for table in ("users", "hourly_stats", "tenant_settings"):
                            work.execute(f"DELETE FROM {table} WHERE tenant_id = %s", (tid,))
                    longest_batch, batches = (time.monotonic() - t1) * 1000, 1
                    spread = ""
                total = time.monotonic() - t0
                time.sleep(0.05)
                sampler.stop.set()
                bystander.stop.set()
                sampler.join()
                bystander.join()
                left = work.execute("SELECT count(*) FROM events WHERE tenant_id = %s", (tid,)).fetchone()[0]
                vacuums = watch.execute("SELECT autovacuum_count + autoanalyze_count FROM pg_stat_user_tables "
                                        "WHERE relname = 'events'").fetchone()[0]
                assert left == 0, f"{slug}: {left} events left"
                results[how] = {"total_s": total, "lock_ms": sampler.longest_ms("RowExclusiveLock"),
                                "any_lock_ms": sampler.longest_ms(), "txns": sampler.transactions(),
                                "samples": sampler.samples, "batch_ms": longest_batch, "batches": batches,
                                "autovacuum": vacuums,
                                "bystander_max_s": max(bystander.waits, default=0.0),
                                "bystander_median_ms": statistics.median(bystander.waits) * 1000 if bystander.waits else 0}
                r = results[how]
                print(f"{how:13}: total {r['total_s']:.1f} s; longest RowExclusiveLock on events {r['lock_ms']:.0f} ms "
                      f"({r['txns']} deleting transactions seen in {r['samples']} samples; any lock of the deleting "
                      f"session: {r['any_lock_ms']:.0f} ms); longest batch {r['batch_ms']:.0f} ms "
                      f"over {r['batches']} batches; a SHARE lock on events waited up to {r['bystander_max_s']:.2f} s "
                      f"(median {r['bystander_median_ms']:.1f} ms)", flush=True)
                if spread:
                    print(f"{'':15}{spread}", flush=True)
                print(f"{'':15}longest hold: {sampler.longest_query()}; autovacuum/analyze runs on events so far: "
                      f"{r['autovacuum']}", flush=True)
        with db.connect(cfg) as conn:
            c_left = conn.execute("SELECT count(*) FROM events WHERE tenant_id = %s", (ids["bench-c"],)).fetchone()[0]
            assert c_left == args.events // 10, "the bystander tenant lost rows"
        print(f"machine: {platform.platform()}, {os.cpu_count()} cores, PostgreSQL "
              f"{db.connect(cfg).execute('SHOW server_version').fetchone()[0]}, batch {args.batch}")
    finally:
        if not args.keep:
            with db.connect_dsn(cluster.dsn("postgres", "postgres"), cluster.passfile) as c:
                c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


if __name__ == "__main__":
    main()
