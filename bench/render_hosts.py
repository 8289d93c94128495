"""Benchmark: render and check nginx and iptables configuration for 50, 500 and 2000 tenants.

For each count: render every nginx file (main, zones, vhosts) and run the real ``nginx -t`` on
the tree (one shared self-signed certificate); render the IPv4 baseline plus every tenant's
ruleset and load it with the real ``iptables-restore --noflush`` in a fresh scratch network
namespace (including reading ``iptables-save`` first to plan the hooks, and back afterwards to
check there is no drift). Median of several runs. Needs root, nginx, iptables and iproute2.

    .venv/bin/python bench/render_hosts.py [--counts 50,500,2000] [--runs 3] [--write]

``--write`` replaces this benchmark's section in bench/RESULTS.md. Target: ≤ 5 s in total for
500 tenants (render + nginx -t + iptables load).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dn.config import PlanConfig  # noqa: E402
from dn.models import parse_host, parse_tenant  # noqa: E402
from dn.render.iptables import combined_restore_text, parse_save, render_baseline, render_tenants  # noqa: E402
from dn.render.nginx import render_all  # noqa: E402
from tests.integration.test_nginx_render_real import netns, nginx_t, self_signed, write_nginx_tree  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADING = "## Render and check nginx + iptables per host (bench/render_hosts.py)"


def tenants(n: int):
    plans = {"standard": PlanConfig()}
    out = []
    for i in range(n):
        slug = f"tenant{i:04d}"
        out.append(
            parse_tenant(
                {
                    "slug": slug,
                    "domains": [f"{slug}.example", f"www.{slug}.example"],
                    "image": "dn.local/sgtm-standin:1",
                    "container_config": "aWQ9R1RNLVhYWFgmZW52PTE=",
                    "subnet": f"10.210.{i // 16}.{(i % 16) * 16}/28",
                },
                plans=plans,
            )
        )
    return out


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench(n: int, runs: int, cert) -> dict[str, float]:
    ts = tenants(n)
    figures: dict[str, list[float]] = {k: [] for k in ("nginx_render", "nginx_t", "ipt_render", "ipt_load")}
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="dn-bench-") as d:
            host = parse_host({"name": "bench", "prefix": d, "admin_sources": ["192.0.2.10/32"]})
            dt, _files = timed(lambda: render_all(host, ts))
            figures["nginx_render"].append(dt)
            write_nginx_tree(host, ts, cert=cert)
            dt, r = timed(lambda: nginx_t(host))
            if r.returncode != 0:
                raise SystemExit(f"nginx -t failed for {n} tenants:\n{r.stderr[:2000]}")
            figures["nginx_t"].append(dt)

            dt, rulesets = timed(lambda: [render_baseline(host)[4], *render_tenants(ts, host)])
            figures["ipt_render"].append(dt)
            with netns("bench") as ns:
                def load():
                    cur = parse_save(subprocess.run(["ip", "netns", "exec", ns, "iptables-save"], capture_output=True, text=True, check=True).stdout)
                    text = combined_restore_text(rulesets, cur)
                    subprocess.run(["ip", "netns", "exec", ns, "iptables-restore", "--noflush"], input=text, text=True, check=True)
                    return parse_save(subprocess.run(["ip", "netns", "exec", ns, "iptables-save"], capture_output=True, text=True, check=True).stdout)

                dt, after = timed(load)
                drift = [x for rs in rulesets for x in rs.drift(after)]
                if drift:
                    raise SystemExit(f"drift after loading {n} tenants: {drift[:5]}")
                figures["ipt_load"].append(dt)
    med = {k: statistics.median(v) for k, v in figures.items()}
    med["total"] = sum(med.values())
    med["rules"] = sum(len(rs.rules) + len(rs.hooks) for rs in rulesets)
    return med


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip().removeprefix("nginx version: ")
    ipt = subprocess.run(["iptables", "-V"], capture_output=True, text=True).stdout.strip()
    return f"{platform.platform()}, {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {nginx}, {ipt}"


def section(rows: list[tuple[int, dict[str, float]]], runs: int) -> str:
    lines = [
        HEADING,
        "",
        "Render every nginx file and run the real `nginx -t`; render the IPv4 baseline and every tenant's",
        "ruleset and load them with the real `iptables-restore --noflush` into a fresh network namespace",
        "(iptables-save before and after included). Two domains per tenant, one shared self-signed certificate.",
        f"Median of {runs} runs, seconds. Run: `.venv/bin/python bench/render_hosts.py --write` (root).",
        "",
        "| tenants | nginx render | nginx -t | iptables render | iptables load | total | iptables rules |",
        "|--------:|-------------:|---------:|----------------:|--------------:|------:|---------------:|",
    ]
    for n, m in rows:
        lines.append(
            f"| {n} | {m['nginx_render']:.3f} | {m['nginx_t']:.3f} | {m['ipt_render']:.3f} | {m['ipt_load']:.3f} | {m['total']:.3f} | {int(m['rules'])} |"
        )
    target = next((m for n, m in rows if n == 500), None)
    if target is not None:
        verdict = "met" if target["total"] <= 5.0 else "NOT met"
        lines += ["", f"Target ≤ 5 s in total for 500 tenants: {verdict} ({target['total']:.2f} s)."]
    lines += ["", f"Machine: {machine()}.", ""]
    return "\n".join(lines)


def write_section(text: str) -> None:
    """Replace this benchmark's section in place (other benchmarks own the other sections)."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if HEADING in old:
        start = old.index(HEADING)
        nxt = old.find("\n## ", start + len(HEADING))
        rest = old[nxt + 1:] if nxt != -1 else ""
        RESULTS.write_text(old[:start] + text.rstrip("\n") + "\n" + ("\n" + rest if rest else ""))
    else:
        RESULTS.write_text(old.rstrip("\n") + "\n\n" + text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="50,500,2000")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section in bench/RESULTS.md")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, iptables)")
    cert = self_signed(["bench.example"])
    rows = []
    for n in (int(c) for c in args.counts.split(",")):
        m = bench(n, args.runs, cert)
        print(f"{n:5d} tenants: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()), flush=True)
        rows.append((n, m))
    text = section(rows, args.runs)
    print("\n" + text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
