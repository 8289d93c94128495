"""Latency of dn.engine operations on the real CLI: up, no-op up, preview, refresh, destroy.

    .venv/bin/python bench/engine_ops.py [--resources 10] [--rounds 3]

A stack of N dynamic-provider files (tests/fixtures/engine_provider.py) in a scratch data dir with a
local file backend. Prints the median seconds per operation over the rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pulumi  # noqa: E402

from dn import engine  # noqa: E402
from dn.config import load_settings  # noqa: E402


def program(target: Path, n: int, content: str):
    def run() -> None:
        from tests.fixtures.engine_provider import LocalFile

        for i in range(n):
            LocalFile(f"f{i}", path=str(target / f"f{i}.conf"), content=content, token=pulumi.Output.secret("t"))

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resources", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="dn-bench-engine-"))
    try:
        (scratch / "dn" / "sandbox").mkdir(parents=True)
        pf = scratch / "dn" / "sandbox" / "passphrase"
        pf.write_text("bench passphrase\n")
        pf.chmod(0o600)
        env = dict(os.environ, DN_HOME=str(scratch / "dn"))
        env.pop("DN_CONFIG", None)
        settings = load_settings(environ=env)
        times: dict[str, list[float]] = {}

        def timed(name: str, fn) -> None:
            t0 = time.monotonic()
            fn()
            times.setdefault(name, []).append(time.monotonic() - t0)

        extra = {"PYTHONPATH": str(REPO)}
        for r in range(args.rounds):
            name = f"bench{r}"
            out = scratch / "out" / name
            timed("select", lambda: engine.stack(settings, name, program(out, args.resources, "a"), extra_env=extra, environ=env))
            st = engine.stack(settings, name, program(out, args.resources, "a"), extra_env=extra, environ=env)
            timed("up (create)", lambda: engine.up(st))
            timed("up (no change)", lambda: engine.up(st))
            st2 = engine.stack(settings, name, program(out, args.resources, "b"), extra_env=extra, environ=env)
            timed("preview (all change)", lambda: engine.preview(st2))
            timed("refresh", lambda: engine.refresh(st))
            timed("destroy", lambda: engine.destroy(st, remove=True))
        print(json.dumps({"resources": args.resources, "rounds": args.rounds,
                          "median_seconds": {k: round(statistics.median(v), 2) for k, v in times.items()}}, indent=2))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
