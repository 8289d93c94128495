"""What the firewall accepts, what listens, how tenants are attached: the pure readings behind
net.public-ports, net.admin-ssh and net.tenant-isolation."""
from __future__ import annotations

import pytest

from dn.config import PlanConfig
from dn.models import HostBaseline, parse_tenant
from dn.render.iptables import SavedTable, parse_save, render_baseline, render_tenants
from dn.verify import network as n
from dn.verify.tenants import TenantNames

ADMIN = ["10.231.1.1/32"]

PLANS = {"standard": PlanConfig()}


def _host() -> HostBaseline:
    return HostBaseline(name="eu1", admin_sources=tuple(ADMIN))


def applied_baseline(extra_input: list[tuple[str, ...]] = (), policy: str = "DROP") -> dict[str, SavedTable]:
    """The filter table as iptables-save shows it after dn's baseline is applied (IPv4)."""
    rs = render_baseline(_host())[4]
    t = SavedTable()
    t.policies.update({"INPUT": policy, "FORWARD": "DROP", "OUTPUT": "ACCEPT"})
    for c in (*rs.chains, *rs.ensure):
        t.policies[c] = None
    t.rules["INPUT"] = [("-j", "DN-INPUT")]
    for chain, rule in rs.rules:
        t.rules.setdefault(chain, []).append(rule)
    t.rules["DN-INPUT"] += list(extra_input)
    return {"filter": t}


def public(accepts):
    return [a for a in accepts if a.public]


def test_baseline_exposes_only_80_443_and_ssh_to_admins():
    policy, accepts = n.input_accepts(applied_baseline(), 4)
    assert policy == "DROP"
    (pub,) = public(accepts)
    assert pub.proto == "tcp" and pub.ports == ((80, 80), (443, 443)) and pub.path == ("INPUT", "DN-INPUT")
    (ssh,) = [a for a in accepts if a.covers("tcp", 22)]
    assert ssh.sources == ("10.231.1.1/32",) and n.within_admin(ssh.sources, ADMIN)
    assert not any(a.covers("tcp", 5432) for a in accepts)


@pytest.mark.parametrize("rule, port, is_public", [
    (("-p", "tcp", "-m", "tcp", "--dport", "9999", "-j", "ACCEPT"), 9999, True),
    (("-p", "udp", "-m", "multiport", "--dports", "5000:5100,53", "-j", "ACCEPT"), 5050, True),
    (("-p", "tcp", "-m", "tcp", "!", "--dport", "22", "-j", "ACCEPT"), 6379, True),
    (("-j", "ACCEPT"), 1, True),
    (("-s", "10.0.0.0/8", "-p", "tcp", "-m", "tcp", "--dport", "5432", "-j", "ACCEPT"), 5432, False),
    (("!", "-s", "10.0.0.0/8", "-p", "tcp", "-m", "tcp", "--dport", "5432", "-j", "ACCEPT"), 5432, True),
    (("!", "-i", "docker0", "-p", "tcp", "-m", "tcp", "--dport", "8080", "-j", "ACCEPT"), 8080, True),
])
def test_holes_are_found(rule, port, is_public):
    _, accepts = n.input_accepts(applied_baseline([rule]), 4)
    hits = [a for a in accepts if a.covers(rule[rule.index("-p") + 1] if "-p" in rule else "tcp", port)]
    assert hits and any(a.public for a in hits) is is_public


@pytest.mark.parametrize("rule", [
    ("-i", "lo", "-j", "ACCEPT"),
    ("-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"),
    ("-m", "state", "--state", "ESTABLISHED", "-j", "ACCEPT"),
    ("-i", "dnt+", "-p", "tcp", "-m", "tcp", "--dport", "5432", "-j", "ACCEPT"),
    ("-d", "127.0.0.0/8", "-p", "tcp", "-m", "tcp", "--dport", "5432", "-j", "ACCEPT"),
    ("-p", "icmp", "-j", "ACCEPT"),
    ("-p", "tcp", "-m", "tcp", "--dport", "5432", "-j", "DROP"),
])
def test_internal_or_refusing_rules_expose_nothing(rule):
    _, accepts = n.input_accepts(applied_baseline([rule]), 4)
    assert not any(a.covers("tcp", 5432) or a.proto is None for a in public(accepts))


def test_policy_accept_is_everything_unless_input_ends_in_a_drop():
    policy, accepts = n.input_accepts(applied_baseline(policy="ACCEPT"), 4)
    assert policy == "ACCEPT" and any(a.rule == "INPUT policy ACCEPT" and a.ports is None for a in accepts)
    tables = applied_baseline(policy="ACCEPT")
    tables["filter"].rules["INPUT"].append(("-j", "DROP"))
    _, accepts = n.input_accepts(tables, 4)
    assert not any(a.rule.startswith("INPUT policy") for a in accepts)


def test_no_rules_loaded_accepts_everything():
    policy, accepts = n.input_accepts(parse_save(""), 6)
    assert policy.startswith("ACCEPT") and accepts[0].public and accepts[0].ports is None


def test_restrictions_carry_into_jumped_chains_and_loops_end():
    tables = applied_baseline([("-p", "tcp", "-j", "MINE")])
    t = tables["filter"]
    t.policies["MINE"] = None
    t.rules["MINE"] = [("-m", "tcp", "--dport", "3306", "-j", "ACCEPT"), ("-j", "MINE")]
    _, accepts = n.input_accepts(tables, 4)
    (mysql,) = [a for a in accepts if a.covers("tcp", 3306)]
    assert mysql.proto == "tcp" and mysql.path == ("INPUT", "DN-INPUT", "MINE") and mysql.public


def test_ipset_sources_are_not_shown_to_be_admins():
    rule = ("-p", "tcp", "-m", "set", "--match-set", "admins", "src", "-m", "tcp", "--dport", "22", "-j", "ACCEPT")
    _, accepts = n.input_accepts(applied_baseline([rule]), 4)
    (a,) = [x for x in accepts if x.sources == ("ipset:admins",)]
    assert not a.public and not n.within_admin(a.sources, ADMIN)


DOCKER_NAT = """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A DOCKER -i docker0 -j RETURN
-A DOCKER -d 127.0.0.1/32 ! -i docker0 -p tcp -m tcp --dport 18081 -j DNAT --to-destination 10.231.64.2:8080
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8443 -j DNAT --to-destination 10.231.64.3:8443
COMMIT
"""


def test_published_ports_are_found_in_nat():
    (fwd,) = n.forwarded(parse_save(DOCKER_NAT), 4)
    assert fwd.kind == "dnat" and fwd.ports == ((8443, 8443),) and fwd.public
    assert "forwarded (DNAT)" in fwd.describe()


def test_admin_source_containment():
    assert n.within_admin(["10.231.1.1/32"], ["10.231.1.0/24"])
    assert not n.within_admin(["10.231.0.0/16"], ["10.231.1.0/24"])
    assert not n.within_admin(["2001:db8::1/128"], ["10.231.1.0/24"])
    assert n.address_in("10.231.1.1", ADMIN) and not n.address_in("10.231.1.9", ADMIN)


SS = """tcp LISTEN 0 511 0.0.0.0:80 0.0.0.0:*
tcp LISTEN 0 511 [::]:443 [::]:*
tcp LISTEN 0 128 10.231.1.2:22 0.0.0.0:*
tcp LISTEN 0 4096 127.0.0.53%lo:53 0.0.0.0:*
tcp LISTEN 0 4096 *:9100 *:*
udp UNCONN 0 0 0.0.0.0:68 0.0.0.0:*
udp UNCONN 0 0 [::1]:323 [::]:*
"""


def test_listeners():
    got = n.parse_listeners(SS)
    assert [str(x) for x in got] == ["tcp 10.231.1.2:22", "tcp 127.0.0.53:53", "tcp 0.0.0.0:80", "tcp [::]:443",
                                     "tcp *:9100", "udp 0.0.0.0:68", "udp [::1]:323"]
    assert [x.loopback for x in got] == [False, True, False, False, False, False, True]
    ports = n.scan_ports(got, 22)
    assert 9100 in ports and 53 in ports and 1024 in ports and 5432 in ports and 2000 not in ports
    assert n.host_service_ports(got, ["tcp/9100"]) == [22, 80]


# --------------------------------------------------------------------------- tenants


def _spec(slug, subnet):
    return parse_tenant({"slug": slug, "domains": [f"{slug}.example"], "image": "dn.local/x:1", "subnet": subnet},
                        plans=PLANS, host_view=True)


def _net(t, icc="false", bridge=None, driver="bridge"):
    return {"Name": t.network, "Driver": driver,
            "Options": {"com.docker.network.bridge.enable_icc": icc,
                        "com.docker.network.bridge.name": bridge or t.bridge},
            "IPAM": {"Config": [{"Subnet": t.subnet, "Gateway": t.gateway}]}}


def _ctr(name, nets: dict, running=True, ports=None, mode=None):
    return {"Name": "/" + name, "State": {"Running": running},
            "HostConfig": {"PortBindings": ports or {}, "NetworkMode": mode or next(iter(nets), "default")},
            "NetworkSettings": {"Networks": {k: {"IPAddress": v} for k, v in nets.items()}, "Ports": {}}}


def _filter(*specs) -> SavedTable:
    t = applied_baseline()["filter"]
    for rs in render_tenants(list(specs), _host()):
        for c in rs.chains:
            t.policies[c] = None
        for chain, rule in rs.rules:
            t.rules.setdefault(chain, []).append(rule)
        for h in rs.hooks:
            t.rules.setdefault(h.chain, []).insert(0, h.rule)
    return t


def test_isolated_tenant_has_no_findings():
    a = _spec("acme", "10.210.0.0/28")
    view = n.TenantView(TenantNames("acme"), True, _net(a), [
        _ctr(a.tagging_container, {a.network: a.tagging_address}),
        _ctr(a.preview_container, {a.network: a.preview_address}, running=False)])
    fails, ev = n.structure_findings(view, _filter(a))
    assert fails == []
    assert any("enable_icc=false" in e for e in ev) and any("hooked for bridge" in e for e in ev)


def test_every_isolation_break_is_named():
    a = _spec("acme", "10.210.0.0/28")
    view = n.TenantView(TenantNames("acme"), True, _net(a, icc="true", bridge="br-1234"), [
        _ctr(a.tagging_container, {a.network: a.tagging_address, "bridge": "10.231.64.5"}),
        _ctr(a.preview_container, {"host": ""}, mode="host"),
        _ctr("intruder", {a.network: "10.210.0.9"})])
    fails, _ = n.structure_findings(view, applied_baseline()["filter"])
    text = "\n".join(fails)
    assert "inter-container communication enabled (enable_icc=true)" in text
    assert f"uses bridge br-1234, not {a.bridge}" in text
    assert f"{a.tagging_container} is also attached to bridge" in text
    assert f"{a.preview_container} runs in the host's network namespace" in text
    assert "container intruder (not this tenant's) is attached" in text
    assert "firewall isolation incomplete" in text and f"DN-TENANTS-FWD jump to {a.chain_forward}" in text


def test_published_ports_and_probe_targets():
    c = _ctr("x", {"bridge": "10.231.64.2"}, ports={"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "18081"}]})
    assert n.published_ports(c) == ["127.0.0.1:18081->8080/tcp"]
    a, b = _spec("acme", "10.210.0.0/28"), _spec("beta", "10.210.0.16/28")
    ta, pa = _ctr(a.tagging_container, {a.network: a.tagging_address}), _ctr(a.preview_container, {a.network: a.preview_address})
    tb = _ctr(b.tagging_container, {b.network: b.tagging_address})
    views = n.tenant_views([TenantNames("acme"), TenantNames("beta")], [_net(a), _net(b)], [ta, pa, tb])
    targets = n.probe_targets(ta, views[0], views, ["10.231.1.2"], [22, 80])
    assert targets == [f"{a.preview_address}:8080", f"{b.tagging_address}:8080", f"{a.gateway}:22", f"{a.gateway}:80",
                       "10.231.1.2:22", "10.231.1.2:80"]


def test_unregistered_tenant_networks_are_found():
    a = _spec("ghost", "10.210.0.32/28")
    views = n.tenant_views([], [_net(a), {"Name": "bridge", "Driver": "bridge"}], [])
    assert [(v.names.slug, v.registered) for v in views] == [("ghost", False)]
