"""Cost of auditing: one privileged() operation, one bare append, and verifying the chain.

Runs against a scratch database ``dn_bench_<pid>`` on the tests' PostgreSQL cluster
(``/srv/dn-test-pg``, port 54330; started if needed, as root), migrated with dn's own code and
dropped afterwards, so it never writes into a real audit log.

    .venv/bin/python bench/audit_append.py [--n 300]

Measured per operation (median and p95 over --n runs):
- privileged(): connect (scram-sha-256 auth), take a tenant lock (advisory lock + op_locks row),
  empty body, append the entry, release, close — what every privileged dn command pays;
- append on an open connection: chain lock, head read, hash, insert with the head trigger;
- verify of the whole chain afterwards (per entry), with a pinned anchor key and the witness in a
  private directory of the sandbox's second region (`dn sandbox up`; removed afterwards): the
  region part (SSH connect, newest witness read, one new witness written) is shown on its own.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _stats(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"median {statistics.median(xs) * 1000:.2f} ms, p95 {xs[int(len(xs) * 0.95) - 1] * 1000:.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    args = ap.parse_args()

    from psycopg import sql

    from dn import audit, db
    from dn.backup.store import Store
    from dn.config import Settings, embedded_default
    from dn.context import Context
    from dn.pgcluster import Cluster

    root = Path(os.environ.get("DN_TEST_PG_ROOT", "/srv/dn-test-pg"))
    cluster = Cluster(root, int(os.environ.get("DN_TEST_PG_PORT", "54330")), root.parent / f"{root.name}.pgpass").ensure()
    name = f"dn_bench_{os.getpid()}"
    with db.connect_dsn(cluster.dsn("postgres", "postgres"), cluster.passfile) as c:
        c.execute(sql.SQL("CREATE DATABASE {} OWNER dn_owner").format(sql.Identifier(name)))
        c.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO dn").format(sql.Identifier(name)))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            from dn.config import default_data_dir

            region = {**embedded_default(default_data_dir())["backup"], "path": f"/backups/bench-{os.getpid()}",
                      "retries": 0}
            settings = Settings.model_validate({
                "data_dir": tmp, "hosts": {}, "backup": region,
                "database": {"dsn": cluster.dsn("dn", name), "admin_dsn": cluster.dsn("dn_owner", name),
                             "passfile": str(cluster.passfile)}})
            pinned = audit.pinned_key(audit.public_key_b64(audit.anchor_key(settings)))
            settings = settings.model_copy(update={"audit": settings.audit.model_copy(update={"anchor_keys": [pinned]})})
            db.migrate(settings.database, bootstrap_dsn=cluster.dsn("postgres", name))
            ctx = Context(_settings=settings)
            priv = []
            for i in range(args.n):
                t = time.perf_counter()
                with audit.privileged(ctx, "bench", {"i": i, "password": "x"}, tenant="bench"):
                    pass
                priv.append(time.perf_counter() - t)
            bare = []
            with db.connect(settings.database) as conn:
                for i in range(args.n):
                    t = time.perf_counter()
                    audit.append(conn, actor="bench", actor_key=None, command="bench", args={"i": i}, tenant=None,
                                 host=None, outcome="ok", exit_code=0, request_id="bench")
                    bare.append(time.perf_counter() - t)
            store = Store.open(settings.backup, retries=0)
            try:
                t = time.perf_counter()
                result = audit.verify(ctx, store=store)
                verify_s = time.perf_counter() - t
                t = time.perf_counter()
                audit.read_region_witness(store, audit.trusted_anchor_keys(settings))
                read_s = time.perf_counter() - t
                t = time.perf_counter()
                connect_s = (Store.open(settings.backup, retries=0).close(), time.perf_counter() - t)[1]
                assert result.ok and result.last_seq == 2 * args.n and result.recorded is not None
            finally:
                from tests.fixtures.sandbox import sftp_rmtree

                sftp_rmtree(store.sftp, store.root)
                store.close()
    finally:
        with db.connect_dsn(cluster.dsn("postgres", "postgres"), cluster.passfile) as c:
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    print(f"privileged() with a tenant lock, one entry: {_stats(priv)}")
    print(f"append on an open connection:              {_stats(bare)}")
    print(f"verify {result.last_seq} entries (region open): {verify_s * 1000:.1f} ms "
          f"({verify_s / result.last_seq * 1e6:.0f} µs/entry, one new witness written)")
    print(f"second region: connect {connect_s * 1000:.0f} ms, newest witness read {read_s * 1000:.1f} ms")


if __name__ == "__main__":
    main()
