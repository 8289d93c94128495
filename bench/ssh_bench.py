"""Benchmark dn.ssh against the sandbox EU host, and `dn sandbox up`.

Run as root with the sandbox up for the data dir given (default: the tests' data dir):

    .venv/bin/python bench/ssh_bench.py [--data-dir /srv/dn-sandbox/test-data] [--rounds 20] [--sandbox-cycle]

Prints the median of each figure. ``--sandbox-cycle`` also takes the sandbox down and measures
``up`` from nothing and ``up`` when already up (do not use it while tests use the sandbox).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dn import sandbox, ssh  # noqa: E402
from dn.config import Settings, embedded_default  # noqa: E402


def timed(fn, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, default=Path("/srv/dn-sandbox/test-data"))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--sandbox-cycle", action="store_true")
    args = ap.parse_args()
    settings = Settings.model_validate(embedded_default(args.data_dir))
    host = settings.host()

    def connect_close() -> None:
        ssh.connect(host).close()

    print(f"connect + auth + close      {timed(connect_close, args.rounds) * 1000:8.1f} ms")
    work = "/srv/dn-sandbox/eu1/var/tmp/bench"
    with ssh.connect(host) as s:
        s.mkdir_p(work)
        print(f"run true                    {timed(lambda: s.run(['true']), args.rounds) * 1000:8.1f} ms")
        secret = os.urandom(4096)
        print(f"run cat, 4 KiB stdin        {timed(lambda: s.run(['cat'], stdin=secret), args.rounds) * 1000:8.1f} ms")
        data = os.urandom(64 * 1024)
        counter = iter(range(10**9))
        print(f"install_file 64 KiB change  "
              f"{timed(lambda: s.install_file(f'{work}/f', data + str(next(counter)).encode()), args.rounds) * 1000:8.1f} ms")
        print(f"install_file unchanged      {timed(lambda: s.install_file(f'{work}/same', data), args.rounds) * 1000:8.1f} ms")

        def tx10() -> None:
            n = next(counter)
            with s.transaction(check=["true"]) as tx:
                for i in range(10):
                    tx.put(f"{work}/t{i}", f"{n}-{i}\n".encode())

        print(f"transaction 10 files+check  {timed(tx10, args.rounds) * 1000:8.1f} ms")
        big = os.urandom(32 * 1024 * 1024)
        t = time.perf_counter()
        s.install_file(f"{work}/big", big)
        print(f"install_file 32 MiB         {(time.perf_counter() - t) * 1000:8.1f} ms "
              f"({32 / (time.perf_counter() - t):.0f} MiB/s)")
        s.run(["rm", "-rf", work])

    if args.sandbox_cycle:
        dn = str(Path(sys.executable).with_name("dn"))
        env = {**os.environ, "DN_HOME": str(args.data_dir)}
        subprocess.run([dn, "sandbox", "down"], env=env, check=True, capture_output=True)
        t = time.perf_counter()
        subprocess.run([dn, "sandbox", "up"], env=env, check=True, capture_output=True)
        print(f"dn sandbox up from nothing  {time.perf_counter() - t:8.2f} s")
        again = timed(lambda: subprocess.run([dn, "sandbox", "up"], env=env, check=True, capture_output=True), 5)
        print(f"dn sandbox up when up       {again:8.2f} s")
        in_process = timed(lambda: sandbox.up(args.data_dir), 5)
        print(f"sandbox.up() when up        {in_process * 1000:8.1f} ms (in process, no interpreter start)")


if __name__ == "__main__":
    main()
