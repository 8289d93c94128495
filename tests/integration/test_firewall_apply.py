"""The host firewall applied over SSH to the sandbox EU host, and checked with real traffic.

Tenant containers (the stand-in image on per-tenant Docker networks, ICC off, bridges named as dn
names them) try to reach each other and the host's services; a port-range probe from this (root)
namespace checks what answers on 10.231.1.2, from an address that is not an admin source and from
one that is. Failed applies are compared with ``iptables-save`` taken before (counters ignored).

Afterwards the module removes its tenants' chains, containers and networks; dn's baseline stays
(it is what ``dn host up`` puts on the host, and other sessions sharing the sandbox rely on it).
"""
from __future__ import annotations

import errno
import resource
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pytest

from dn import ssh
from dn.errors import ExitCode, PolicyViolation
from dn.host import firewall as fw
from dn.host.plan import ApplyRefused
from dn.models import HostBaseline, TenantSpec
from dn.render.iptables import DN_INPUT, DOCKER_USER, TENANTS_DEFAULT_DROP, TENANTS_FWD, TENANTS_IN, parse_save
from tests.integration.test_nginx_apply import EU1, Tenants, tenant

pytestmark = pytest.mark.sandbox

ALLOWED_SERVICE = 9999  # a host service tenants may reach (tenant_host_services)
OTHER_SERVICE = 9998  # a host service they must not reach
OUTSIDER = "10.231.1.200"  # a source address in the root namespace that is not an admin source


def save(sandbox, family: int) -> str:
    return sandbox.ns_exec([fw.SAVE[family]]).stdout.decode()


def rules_now(sandbox) -> dict[int, str]:
    return {f: fw.normalized(save(sandbox, f)) for f in fw.FAMILIES}


@dataclass
class FwEnv:
    host: HostBaseline
    tenants: Tenants
    a: TenantSpec
    b: TenantSpec


@pytest.fixture(scope="module")
def fw_env(sandbox) -> Iterator[FwEnv]:
    host = HostBaseline.from_settings(sandbox.settings, tenant_host_services=(f"tcp/{ALLOWED_SERVICE}",))
    tenants = Tenants(sandbox, host)
    listeners = [
        subprocess.Popen(["ip", "netns", "exec", "dn-eu1", sys.executable, "-m", "http.server", "--bind", "0.0.0.0",
                          str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
        for port in (ALLOWED_SERVICE, OTHER_SERVICE)
    ]
    try:
        a = tenants.add(tenant("fwa", "10.210.20.0/28"), preview=False)
        b = tenants.add(tenant("fwb", "10.210.20.16/28"), preview=False)
        with ssh.connect(sandbox.host) as s:
            fw.converge_baseline(s, host)
            fw.converge_tenant(s, host, a)
            fw.converge_tenant(s, host, b)
        yield FwEnv(host, tenants, a, b)
    finally:
        for p in listeners:
            p.terminate()
            p.wait(timeout=10)
        with ssh.connect(sandbox.host) as s:
            for t in tenants.made:
                fw.remove_tenant(s, host, t)
            fw.converge_baseline(s, host)
        tenants.cleanup()


# --------------------------------------------------------------------------- in place, once


def test_baseline_and_tenant_chains_are_in_place_and_applying_twice_adds_nothing(fw_env, sandbox):
    v4 = parse_save(save(sandbox, 4))["filter"]
    v6 = parse_save(save(sandbox, 6))["filter"]
    assert v4.policies["INPUT"] == "DROP" and v6.policies["INPUT"] == "DROP" and v6.policies["FORWARD"] == "DROP"
    assert v4.count("INPUT", ("-j", DN_INPUT)) == 1 and v6.count("INPUT", ("-j", DN_INPUT)) == 1
    assert v4.count(DOCKER_USER, ("-j", TENANTS_FWD)) == 1
    for t in (fw_env.a, fw_env.b):
        assert v4.count(TENANTS_FWD, ("-i", t.bridge, "-g", t.chain_forward)) == 1
        assert v4.count(TENANTS_IN, ("-i", t.bridge, "-j", t.chain_input)) == 1
    assert v4.chain(TENANTS_FWD)[-1] == TENANTS_DEFAULT_DROP and v4.count(TENANTS_FWD, TENANTS_DEFAULT_DROP) == 1
    assert any("DOCKER" in c and c != DOCKER_USER for c in v4.policies)  # Docker's own chains untouched
    before = rules_now(sandbox)
    with ssh.connect(sandbox.host) as s:
        assert fw.converge_baseline(s, fw_env.host).empty
        assert fw.converge_tenant(s, fw_env.host, fw_env.a).empty
        assert fw.converge_tenant(s, fw_env.host, fw_env.b).empty
    assert rules_now(sandbox) == before


# --------------------------------------------------------------------------- isolation, with real traffic


def tcp_from(s: ssh.Session, container: str, address: str, port: int,
             send: bytes = b"GET /healthz HTTP/1.0\r\n\r\n") -> ssh.Result:
    """A TCP exchange from inside ``container`` (busybox nc, 2 s connect timeout)."""
    return s.run(["docker", "exec", "-i", container, "nc", "-w", "2", address, str(port)], stdin=send,
                 check=False, timeout=30)


def dropped(r: ssh.Result) -> bool:
    return r.rc != 0 and b"timed out" in r.stderr and not r.stdout


def test_a_tenant_container_reaches_neither_other_tenants_nor_host_services(fw_env, sandbox):
    a, b = fw_env.a, fw_env.b
    with ssh.connect(sandbox.host) as s:
        # the host service tenants may use answers: the probe can succeed
        r = tcp_from(s, a.tagging_container, EU1, ALLOWED_SERVICE)
        assert r.rc == 0 and r.stdout.startswith(b"HTTP/1.0 "), r
        # another host service, over the host address and over the tenant's own gateway: dropped
        for target in (EU1, a.gateway):
            assert dropped(tcp_from(s, a.tagging_container, target, OTHER_SERVICE)), target
        # sshd: no banner comes back
        r = tcp_from(s, a.tagging_container, EU1, 22, send=b"")
        assert dropped(r) and b"SSH-" not in r.stdout, r
        # tenant b's container, which the host itself reaches
        assert sandbox.ns_exec(["curl", "-s", "-m", "5", f"http://{b.tagging_address}:8080/healthz"]).stdout == b"ok"
        assert dropped(tcp_from(s, a.tagging_container, b.tagging_address, 8080))
        assert dropped(tcp_from(s, b.tagging_container, a.tagging_address, 8080))


def probe(source: str, ports: Iterable[int], *, batch: int = 6000, wait: float = 0.6) -> set[int]:
    """Ports of 10.231.1.2 that answer a TCP SYN from ``source`` (accepted or refused); the
    others are filtered (no answer within ``wait`` seconds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < batch + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, batch + 256), hard))
    answered: set[int] = set()
    ports = list(ports)
    for i in range(0, len(ports), batch):
        sel = selectors.DefaultSelector()
        socks = []
        try:
            for port in ports[i:i + batch]:
                so = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                so.setblocking(False)
                so.bind((source, 0))
                rc = so.connect_ex((EU1, port))
                if rc in (0, errno.ECONNREFUSED):
                    answered.add(port)
                    so.close()
                    continue
                sel.register(so, selectors.EVENT_WRITE, port)
                socks.append(so)
            deadline = time.monotonic() + wait
            while socks and time.monotonic() < deadline:
                for key, _ in sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    err = key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err in (0, errno.ECONNREFUSED):
                        answered.add(key.data)
                    sel.unregister(key.fileobj)
                    key.fileobj.close()
                    socks.remove(key.fileobj)
        finally:
            for so in socks:
                so.close()
            sel.close()
    return answered


def test_from_outside_only_80_and_443_answer(fw_env, sandbox):
    subprocess.run(["ip", "addr", "add", f"{OUTSIDER}/32", "dev", "dn-eu1"], check=True)
    try:
        outside = probe(OUTSIDER, range(1, 65536))
        admin = probe("10.231.1.1", range(1, 65536))
    finally:
        subprocess.run(["ip", "addr", "del", f"{OUTSIDER}/32", "dev", "dn-eu1"], check=False)
    assert outside == {80, 443}
    assert admin == {22, 80, 443}  # sshd, for the admin source only; the listeners on 9998/9999 never


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("what", ["tenant", "baseline"])
def test_a_failed_apply_restores_the_previous_rules_exactly(fw_env, sandbox, what):
    host = HostBaseline.from_settings(
        sandbox.settings, tenant_host_services=(f"tcp/{ALLOWED_SERVICE}", "udp/53"),
        admin_sources=("10.231.1.1/32", "192.0.2.0/24", "2001:db8::/48"))
    before = rules_now(sandbox)
    steps: list[str] = []

    def tamper(step: str) -> None:
        steps.append(step)
        if step == "check":  # someone else's rule lands in dn's chain right after the apply
            chain = fw_env.a.chain_input if what == "tenant" else DN_INPUT
            sandbox.ns_exec(["iptables", "-w", "-I", chain, "1", "-p", "tcp", "--dport", "7", "-j", "ACCEPT"])

    with ssh.connect(sandbox.host) as s:
        with pytest.raises(ApplyRefused) as ei:
            if what == "tenant":
                fw.converge_tenant(s, host, fw_env.a, progress=tamper)
            else:
                fw.converge_baseline(s, host, progress=tamper)
        armed = s.listdir(host.path(f"{host.data_dir}/firewall"))
    assert "not as rendered" in str(ei.value) and "restored exactly" in str(ei.value)
    assert steps == ["save", "arm", "validate", "apply", *(["apply:4"] if what == "tenant" else ["apply:4", "apply:6"]),
                     "check", "rollback"]
    assert rules_now(sandbox) == before
    assert not [n for n in armed if n.startswith("rollback-")]  # the dead-man timer was disarmed


def test_an_apply_that_would_cut_off_admin_ssh_is_refused(fw_env, sandbox):
    bad = HostBaseline.from_settings(sandbox.settings, admin_sources=("192.0.2.0/24",),
                                     tenant_host_services=(f"tcp/{ALLOWED_SERVICE}",))
    before = rules_now(sandbox)
    with ssh.connect(sandbox.host) as s:
        with pytest.raises(PolicyViolation) as ei:
            fw.converge_baseline(s, bad)
    assert ei.value.exit_code == ExitCode.POLICY
    assert "10.231.1.1" in str(ei.value) and "lock itself out" in str(ei.value)
    assert rules_now(sandbox) == before


# --------------------------------------------------------------------------- removal (last: it undoes the setup)


def foreign_tenants(sandbox, mine) -> list[str]:
    """Tenant chains of other sessions sharing the sandbox (their tests may run right now)."""
    v4 = parse_save(save(sandbox, 4))["filter"]
    ours = {c for t in mine for c in (t.chain_forward, t.chain_input)}
    return [c for c in v4.policies if c.startswith(("DN-T-", "DN-TI-")) and c not in ours]


def test_removal_of_tenants_then_baseline(fw_env, sandbox):
    host, a, b = fw_env.host, fw_env.a, fw_env.b
    with ssh.connect(sandbox.host) as s:
        with pytest.raises(PolicyViolation) as ei:
            fw.remove_baseline(s, host)
        assert "still hooked" in str(ei.value)
        assert not fw.remove_tenant(s, host, b).empty
        v4 = parse_save(save(sandbox, 4))["filter"]
        assert b.chain_forward not in v4.policies and b.chain_input not in v4.policies
        assert a.chain_forward in v4.policies and v4.count(TENANTS_FWD, ("-i", a.bridge, "-g", a.chain_forward)) == 1
        assert fw.remove_tenant(s, host, b).empty
        fw.remove_tenant(s, host, a)
        if foreign_tenants(sandbox, (a, b)):
            pytest.skip("another session's tenant chains are hooked in the shared sandbox: the baseline stays")
        try:
            fw.remove_baseline(s, host)
            for family in fw.FAMILIES:
                t = parse_save(save(sandbox, family))["filter"]
                assert t.policies["INPUT"] == "ACCEPT"
                assert not [c for c in t.policies if c.startswith("DN-")]
        finally:
            fw.converge_baseline(s, host)  # back in place for whoever uses the sandbox next
