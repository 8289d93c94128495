"""Cold-start benchmark: `dn --help` and `dn <noun> --help` against `python -c "import typer"`.

Target (foundation issue): each help invocation ≤ 1.5× the baseline, median of repeated runs,
measured in the same run. Usage: .venv/bin/python bench/startup.py [--runs 20]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, cwd=ROOT)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from cli.main import NOUNS

    py = sys.executable
    cases = {"baseline: import typer": [py, "-c", "import typer"], "dn --help": [py, "-m", "cli.main", "--help"]}
    for noun, _, _ in NOUNS:
        cases[f"dn {noun} --help"] = [py, "-m", "cli.main", noun, "--help"]
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.runs):  # interleaved so drift affects every case alike
        for name, argv in cases.items():
            samples[name].append(timed(argv))
    base = statistics.median(samples["baseline: import typer"])
    print(f"{'case':32} {'median ms':>10} {'x baseline':>10}")
    worst = 0.0
    for name, xs in samples.items():
        med = statistics.median(xs)
        ratio = med / base
        if name != "baseline: import typer":
            worst = max(worst, ratio)
        print(f"{name:32} {med * 1000:10.1f} {ratio:10.2f}")
    print(f"worst ratio {worst:.2f} (target <= 1.50); runs per case: {args.runs}")


if __name__ == "__main__":
    main()
