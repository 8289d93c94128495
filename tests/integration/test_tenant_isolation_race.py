"""A tenant bridge is closed until its chains are in place, and stays closed if their apply fails.

On the sandbox EU host, with dn's baseline applied: a tenant's Docker network (bridge named as dn
names it, ICC off) gets a container *before* the tenant's chains exist, as a container would if it
started while ``dn tenant create`` was still applying the firewall. From its first instant the
container tries, over and over, three listeners: one in this (root) namespace at 10.231.1.1
(forwarded traffic: another host's service, as the host sees it), one on the host itself
(10.231.1.2, a service tenants must not reach) and one the tenant's chain allows (a
``tenant_host_services`` port, the control: it shows the probe can succeed). Then the chains are
applied while it keeps trying. Before: nothing answers. After: only the allowed service.

Then the apply fails, refused by ``iptables-restore`` or rolled back after it ran, and the
container still reaches nothing at all. Traffic only to the sandbox's own addresses.
"""
from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime

import pytest

from dn import ssh
from dn.host import firewall as fw
from dn.host.plan import ApplyRefused
from dn.models import HostBaseline, TenantSpec
from dn.render.iptables import TENANTS_DEFAULT_DROP, TENANTS_FWD, parse_save
from tests.integration.test_firewall_apply import dropped, tcp_from
from tests.integration.test_nginx_apply import EU1, IMAGE, tenant, wait_until

pytestmark = pytest.mark.sandbox

ROOT_NS = "10.231.1.1"  # this namespace, as the host routes to it: forwarded traffic
FORWARDED = 9871  # a listener here, in the root namespace
HOST_ONLY = 9872  # a host service tenants must not reach
ALLOWED = 9873  # a host service the tenant chain allows (tenant_host_services)
TARGETS = (f"{ROOT_NS}:{FORWARDED}", f"{EU1}:{HOST_ONLY}", f"{EU1}:{ALLOWED}")
# From the container's start: one attempt per target per round, each line "ok|no ADDR:PORT".
LOOP = ("while true; do for t in " + " ".join(TARGETS) + "; do "
        'if echo x | nc -w 1 "${t%:*}" "${t#*:}" >/dev/null 2>&1; then echo "ok $t"; else echo "no $t"; fi; '
        "done; done")


@dataclasses.dataclass
class RaceEnv:
    host: HostBaseline


def serve_here(stop: threading.Event, port: int = FORWARDED) -> threading.Thread:
    """A listener on this namespace's sandbox address answering "here" until ``stop`` is set."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((ROOT_NS, port))
    srv.listen(64)
    srv.settimeout(0.2)

    def run() -> None:
        with srv:
            while not stop.is_set():
                try:
                    c, _ = srv.accept()
                except TimeoutError:
                    continue
                with c:
                    c.sendall(b"here\n")

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


@pytest.fixture(scope="module")
def race_env(sandbox) -> Iterator[RaceEnv]:
    host = HostBaseline.from_settings(sandbox.settings, tenant_host_services=(f"tcp/{ALLOWED}",))
    stop = threading.Event()
    here = serve_here(stop)
    on_host = [subprocess.Popen(["ip", "netns", "exec", "dn-eu1", sys.executable, "-m", "http.server", "--bind",
                                 "0.0.0.0", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
               for port in (HOST_ONLY, ALLOWED)]
    try:
        with ssh.connect(sandbox.host) as s:
            fw.converge_baseline(s, host)
        yield RaceEnv(host)
    finally:
        stop.set()
        here.join(timeout=5)
        for p in on_host:
            p.terminate()
            p.wait(timeout=10)


def _network(s: ssh.Session, t: TenantSpec) -> None:
    _drop(s, t)
    s.run(["docker", "network", "create", "--driver", "bridge", "--subnet", t.subnet, "--gateway", t.gateway,
           "-o", f"com.docker.network.bridge.name={t.bridge}", "-o", "com.docker.network.bridge.enable_icc=false",
           "--label", f"dn.tenant={t.slug}", t.network])


def _drop(s: ssh.Session, t: TenantSpec) -> None:
    s.run(["docker", "rm", "-f", t.tagging_container], check=False)
    s.run(["docker", "network", "rm", t.network], check=False)


@pytest.fixture
def fresh(race_env, sandbox, request) -> Iterator[TenantSpec]:
    """A tenant whose network exists and whose chains do not."""
    t = tenant(request.param[0], request.param[1])
    with ssh.connect(sandbox.host) as s:
        fw.remove_tenant(s, race_env.host, t)
        _network(s, t)
    try:
        yield t
    finally:
        with ssh.connect(sandbox.host) as s:
            _drop(s, t)
            fw.remove_tenant(s, race_env.host, t)


def _chains(sandbox, t: TenantSpec) -> set[str]:
    v4 = parse_save(sandbox.ns_exec(["iptables-save", "-t", "filter"]).stdout.decode())["filter"]
    assert v4.chain(TENANTS_FWD)[-1] == TENANTS_DEFAULT_DROP  # the baseline's default is in place
    return {c for c in (t.chain_forward, t.chain_input) if c in v4.policies}


def _attempts(s: ssh.Session, container: str) -> list[tuple[float, bool, str]]:
    """(time, reached, target) of every attempt the container logged."""
    out = []
    for line in s.run(["docker", "logs", "-t", container]).text.splitlines():
        stamp, _, rest = line.partition(" ")
        verdict, _, target = rest.partition(" ")
        if verdict in ("ok", "no") and target in TARGETS:
            # RFC 3339 with nanoseconds, UTC: microseconds are enough
            when = datetime.fromisoformat(stamp[:26].rstrip("Z") + "+00:00").timestamp()
            out.append((when, verdict == "ok", target))
    return out


def _rounds(attempts, since: float = 0.0) -> int:
    return min(sum(1 for w, _, tg in attempts if tg == target and w > since) for target in TARGETS)


@pytest.mark.parametrize("fresh", [("rca", "10.210.30.0/28")], indirect=True)
def test_a_container_on_a_new_tenant_bridge_reaches_only_what_its_chain_allows_and_nothing_before(
        race_env, sandbox, fresh):
    t = fresh
    with ssh.connect(sandbox.host) as s:
        assert _chains(sandbox, t) == set()
        s.run(["docker", "run", "-d", "--name", t.tagging_container, "--network", t.network, "--ip", t.tagging_address,
               "--entrypoint", "sh", IMAGE, "-c", LOOP])
        wait_until(lambda: _rounds(_attempts(s, t.tagging_container)) >= 2, timeout=60, what="two rounds of attempts")
        started = time.time()
        fw.converge_tenant(s, race_env.host, t)  # the chains arrive while the container keeps trying
        applied = time.time()
        assert _chains(sandbox, t) == {t.chain_forward, t.chain_input}
        wait_until(lambda: _rounds(_attempts(s, t.tagging_container), applied) >= 2, timeout=60,
                   what="two rounds of attempts after the apply")
        attempts = _attempts(s, t.tagging_container)
    before = {tg for w, ok, tg in attempts if w < started and ok}
    after = {tg for w, ok, tg in attempts if w > applied and ok}
    assert _rounds([a for a in attempts if a[0] < started]) >= 2
    assert before == set(), f"reached before the tenant's chains existed: {sorted(before)}"
    assert after == {f"{EU1}:{ALLOWED}"}, after  # the allowed service answers: the probe works


def _broken(p: fw.FirewallPlan) -> fw.FirewallPlan:
    """The plan with a rule iptables-restore refuses (an unknown match) in its tenant chain."""
    (family, text), = p.restore
    bad = text.replace("\nCOMMIT\n", "\n-A DN-TENANTS-IN -m no-such-match -j ACCEPT\nCOMMIT\n")
    assert bad != text
    return dataclasses.replace(p, restore=((family, bad),))


@pytest.mark.parametrize("fresh, how", [(("rcb", "10.210.30.16/28"), "refused"),
                                        (("rcc", "10.210.30.32/28"), "rolled back")], indirect=["fresh"])
def test_a_failed_firewall_apply_leaves_the_tenant_reaching_nothing(race_env, sandbox, fresh, how):
    t = fresh
    with ssh.connect(sandbox.host) as s:
        s.run(["docker", "run", "-d", "--name", t.tagging_container, "--network", t.network, "--ip", t.tagging_address,
               IMAGE])
        p = fw.plan(fw.tenant_rulesets(race_env.host, t), fw.read(s), name=f"tenant {t.slug}", where=s.where)
        steps: list[str] = []

        def tamper(step: str) -> None:
            steps.append(step)
            if step == "check":  # someone else's rule lands in the tenant's chain: the check fails
                sandbox.ns_exec(["iptables", "-w", "-I", t.chain_input, "1", "-p", "tcp", "--dport", "7", "-j", "ACCEPT"])

        with pytest.raises(ApplyRefused):
            if how == "refused":
                fw.apply(s, race_env.host, _broken(p), progress=steps.append)
            else:
                fw.apply(s, race_env.host, p, progress=tamper)
        assert ("apply" in steps) == (how == "rolled back") and "validate" in steps
        assert _chains(sandbox, t) == set()
        for target in TARGETS:
            address, port = target.split(":")
            r = tcp_from(s, t.tagging_container, address, int(port))
            assert dropped(r), (target, r)


def test_verify_reads_the_default_drop_from_the_live_rules(race_env, sandbox):
    from dn.render.iptables import default_closed_findings
    from dn.verify import core
    from dn.verify.claims import CLAIMS
    from dn.verify.probe import Probe

    with Probe(sandbox.settings) as probe:
        result, = core.run_checks(list(CLAIMS), probe, ["net.tenant-default-closed"])
        v4 = parse_save(probe.iptables_save(4))["filter"]
        v6 = parse_save(probe.iptables_save(6))["filter"]
    assert result.status is core.Status.PASS, result
    # the same live rules without the default drop: what the baseline was before it
    v4.rules[TENANTS_FWD].remove(TENANTS_DEFAULT_DROP)
    fails, _ = default_closed_findings(v4, v6)
    assert any("does not end in the drop" in f for f in fails), fails
