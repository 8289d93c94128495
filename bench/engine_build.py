"""Cold and warm cost of providing the Pulumi CLI from the Go module proxy (dn.tooling).

    .venv/bin/python bench/engine_build.py --cold   # fresh GOMODCACHE, GOCACHE and tools dir
    .venv/bin/python bench/engine_build.py          # the machine's Go caches, a fresh tools dir

Prints wall time, where the CLI came from and the disk each cache took. Scratch dirs are removed
unless --keep. The cold run downloads ~1.5 GB of modules from the proxy.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dn import tooling  # noqa: E402


def du(path: Path) -> int:
    return tooling._du(path) if path.exists() else 0


def go_env(name: str) -> Path:
    return Path(subprocess.run(["go", "env", name], capture_output=True, text=True, check=True).stdout.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cold", action="store_true", help="empty Go module and build caches")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dirs")
    args = ap.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="dn-bench-build-"))
    env = dict(os.environ, DN_TOOLS_DIR=str(scratch / "tools"))
    # a pulumi already on PATH would short-cut the build being measured
    env["PATH"] = os.pathsep.join(d for d in env.get("PATH", "").split(os.pathsep)
                                  if not (Path(d) / "pulumi").exists())
    if args.cold:
        env["GOMODCACHE"] = str(scratch / "gomodcache")
        env["GOCACHE"] = str(scratch / "gocache")
        mod, cache = scratch / "gomodcache", scratch / "gocache"
    else:
        mod, cache = go_env("GOMODCACHE"), go_env("GOCACHE")
    before = {"mod": du(mod), "cache": du(cache)}
    t0 = time.monotonic()
    prov = tooling.ensure(environ=env, log=lambda m: print(m, file=sys.stderr))
    wall = time.monotonic() - t0
    manifest = tooling.read_manifest(prov.root)
    result = {
        "mode": "cold" if args.cold else "warm Go caches",
        "ok": prov.ok,
        "wall_seconds": round(wall, 1),
        "cli": manifest.get("pulumi"),
        "language_python": manifest.get("language_python"),
        "tools_dir_bytes": du(prov.root),
        "gomodcache_growth_bytes": du(mod) - before["mod"],
        "gocache_growth_bytes": du(cache) - before["cache"],
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    if not args.keep:
        subprocess.run(["chmod", "-R", "u+w", str(scratch)], check=False)  # the module cache is read-only
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
