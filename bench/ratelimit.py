"""Benchmark: nginx rate-limit accuracy under a flood, and the neighbour tenant meanwhile.

On the sandbox EU host (``dn sandbox up``; needs root): dn's base config and two tenants applied
with ``dn.host.nginx``, each with stand-in sGTM containers on its own Docker network. Tenant
``rla`` has 10 r/s per client address and no burst; from this (root) namespace a Python load
generator floods it over TLS with keep-alive connections for ``--seconds``. Meanwhile a second
client asks the neighbour tenant ``rlb`` (standard plan) steadily, ``--neighbour-rate`` requests a
second on fresh connections. Traffic goes only to 10.231.1.2.

Reported per run: requests sent, answers 200 / 429 / other, the accepted rate (200s per second
over the flood), its deviation from 10 r/s, and the neighbour's success rate and latency.
Targets: accepted rate within 10% of 10 r/s; neighbour success ≥ 99%.

    .venv/bin/python bench/ratelimit.py [--seconds 20] [--runs 3] [--threads 8] [--write]

``--write`` replaces this benchmark's section in bench/RESULTS.md (other sections stay).
"""
from __future__ import annotations

import argparse
import http.client
import os
import platform
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dn import sandbox as sb  # noqa: E402
from dn import ssh  # noqa: E402
from dn.config import PlanConfig  # noqa: E402
from dn.host import nginx as hn  # noqa: E402
from dn.models import HostBaseline, parse_tenant  # noqa: E402
from tests.fixtures.sandbox import TEST_DATA, sandbox_settings  # noqa: E402
from tests.integration.test_nginx_apply import SNIConnection, Tenants, https  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADING = "## Rate-limit accuracy under a flood (bench/ratelimit.py)"
RATE = 10
PLANS = {
    "bench-flood": PlanConfig(rate_per_ip=RATE, burst_per_ip=0, rate_per_tenant=5000, burst_per_tenant=1000,
                              conn_per_ip=100),
    "standard": PlanConfig(),
}


def tenant(slug: str, subnet: str, plan: str):
    return parse_tenant({"slug": slug, "domains": [f"{slug}.example"], "image": sb.IMAGE, "subnet": subnet,
                         "plan": plan}, plans=PLANS, host_view=True)


def flood(domain: str, ctx, seconds: float, threads: int) -> tuple[Counter, float]:
    counts: Counter = Counter()
    lock = threading.Lock()
    start = time.monotonic()
    stop = start + seconds

    def worker() -> None:
        conn = None
        local: Counter = Counter()
        while time.monotonic() < stop:
            try:
                conn = conn or SNIConnection(domain, ctx)
                local[https(domain, "/g/collect", ctx=ctx, conn=conn).status] += 1
            except (OSError, http.client.HTTPException):
                local["error"] += 1
                if conn:
                    conn.close()
                conn = None
        if conn:
            conn.close()
        with lock:
            counts.update(local)

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return counts, time.monotonic() - start


def neighbour(domain: str, ctx, rate: float, done: threading.Event) -> tuple[Counter, list[float]]:
    counts: Counter = Counter()
    latencies: list[float] = []
    period = 1.0 / rate
    nxt = time.monotonic()
    while not done.is_set():
        t0 = time.monotonic()
        try:
            counts[https(domain, "/g/collect", ctx=ctx).status] += 1
            latencies.append(time.monotonic() - t0)
        except (OSError, http.client.HTTPException):
            counts["error"] += 1
        nxt += period
        time.sleep(max(0.0, nxt - time.monotonic()))
    return counts, latencies


def run_once(a, b, tenants: Tenants, seconds: float, threads: int, neighbour_rate: float) -> dict:
    time.sleep(1.5)  # let the per-address state of the previous run drain
    done = threading.Event()
    result: dict = {}

    def steady() -> None:
        result["neighbour"] = neighbour(b.domains[0], tenants.ctx(b), neighbour_rate, done)

    th = threading.Thread(target=steady)
    th.start()
    try:
        counts, elapsed = flood(a.domains[0], tenants.ctx(a), seconds, threads)
    finally:
        done.set()
        th.join()
    ncounts, lat = result["neighbour"]
    sent = sum(counts.values())
    accepted_rate = counts[200] / elapsed
    ntotal = sum(ncounts.values())
    return {
        "seconds": elapsed,
        "sent": sent,
        "ok": counts[200],
        "limited": counts[429],
        "other": sent - counts[200] - counts[429],
        "offered_rate": sent / elapsed,
        "accepted_rate": accepted_rate,
        "deviation": (accepted_rate - RATE) / RATE,
        "neighbour_total": ntotal,
        "neighbour_success": ncounts[200] / ntotal if ntotal else 0.0,
        "neighbour_p50_ms": statistics.median(lat) * 1000 if lat else float("nan"),
        "neighbour_p99_ms": (sorted(lat)[int(0.99 * (len(lat) - 1))] * 1000) if lat else float("nan"),
    }


def write_section(rows: list[dict], args) -> None:
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    lines = [
        HEADING + f" — {time.strftime('%Y-%m-%d')}",
        "",
        f"A Python load generator ({args.threads} keep-alive TLS connections, SNI, from the root namespace) floods",
        f"tenant `rla` on the sandbox host's real nginx for {args.seconds:g} s per run; its plan allows {RATE} r/s per",
        f"client address with no burst. Meanwhile tenant `rlb` gets {args.neighbour_rate:g} r/s from a second client on",
        "fresh TLS connections. Both tenants' stand-in containers sit on their own Docker networks behind the vhosts",
        f"`dn.host.nginx` applied. {len(rows)} runs. Run: `.venv/bin/python bench/ratelimit.py --write` (root).",
        "",
        "| run | sent | offered r/s | 200 | 429 | other | accepted r/s | vs 10 r/s | neighbour requests | neighbour 200 | neighbour p50 / p99 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(rows, 1):
        lines.append(
            f"| {i} | {r['sent']} | {r['offered_rate']:.0f} | {r['ok']} | {r['limited']} | {r['other']} | "
            f"{r['accepted_rate']:.2f} | {r['deviation'] * 100:+.1f}% | {r['neighbour_total']} | "
            f"{r['neighbour_success'] * 100:.2f}% | {r['neighbour_p50_ms']:.1f} / {r['neighbour_p99_ms']:.1f} ms |"
        )
    ok_rate = abs(med("deviation")) <= 0.10
    ok_neighbour = min(r["neighbour_success"] for r in rows) >= 0.99
    lines += [
        "",
        f"Median accepted rate {med('accepted_rate'):.2f} r/s ({med('deviation') * 100:+.1f}%): target within 10% of "
        f"{RATE} r/s {'met' if ok_rate else 'NOT met'}. Lowest neighbour success "
        f"{min(r['neighbour_success'] for r in rows) * 100:.2f}%: target ≥ 99% {'met' if ok_neighbour else 'NOT met'}.",
        "nginx's leaky bucket works in milliseconds: with no burst a request is accepted once 100 ms have passed "
        "since the last accepted one; at thousands of requests a second the next one arrives well within a "
        "millisecond, so the accepted rate is the configured rate. \"other\": transport errors (a connection "
        "reset under the flood), after which the generator reconnects.",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}; the load "
        "generator, nginx and the containers share these cores.",
        "",
    ]
    text = RESULTS.read_text()
    start = text.find(HEADING)
    section = "\n".join(lines)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(HEADING))
        text = text[:start] + section + ("\n" + text[end + 1:] if end >= 0 else "")
    RESULTS.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--neighbour-rate", type=float, default=5.0)
    ap.add_argument("--write", action="store_true", help="record the figures in bench/RESULTS.md")
    args = ap.parse_args()

    sb.up(TEST_DATA)
    settings = sandbox_settings(TEST_DATA)
    host = HostBaseline.from_settings(settings)
    tenants = Tenants(SimpleNamespace(host=settings.host()), host)  # what Tenants uses of a sandbox handle
    a = tenants.add(tenant("rla", "10.210.60.0/28", "bench-flood"), preview=False)
    b = tenants.add(tenant("rlb", "10.210.60.16/28", "standard"), preview=False)
    rows = []
    try:
        with ssh.connect(settings.host()) as s:
            hn.ensure_base(s, host)
            hn.ensure_vhost(s, host, a)
            hn.ensure_vhost(s, host, b)
        deadline = time.monotonic() + 30
        while True:
            try:
                if all(https(t.domains[0], "/healthz", ctx=tenants.ctx(t)).status == 200 for t in (a, b)):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the stand-in containers did not answer through nginx")
            time.sleep(0.3)
        for i in range(args.runs):
            r = run_once(a, b, tenants, args.seconds, args.threads, args.neighbour_rate)
            rows.append(r)
            print(f"run {i + 1}: sent {r['sent']} ({r['offered_rate']:.0f} r/s), 200 {r['ok']}, 429 {r['limited']}, "
                  f"other {r['other']}; accepted {r['accepted_rate']:.2f} r/s ({r['deviation'] * 100:+.1f}%); "
                  f"neighbour {r['neighbour_success'] * 100:.2f}% of {r['neighbour_total']} "
                  f"(p50 {r['neighbour_p50_ms']:.1f} ms, p99 {r['neighbour_p99_ms']:.1f} ms)", flush=True)
    finally:
        with ssh.connect(settings.host()) as s:
            for t in (a, b):
                hn.remove_vhost(s, host, t)
        tenants.cleanup()
    if args.write:
        write_section(rows, args)
        print(f"recorded in {RESULTS}")


if __name__ == "__main__":
    main()
