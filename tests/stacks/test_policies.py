"""dn's policies as plain functions: each check against dn's own rendered configuration (passes)
and against that configuration with one promise broken (names it)."""
from __future__ import annotations

import pytest

from dn.config import PlanConfig
from dn.host import firewall as fw
from dn.models import host_view_data, parse_host, parse_tenant
from dn.render import nginx as rn
from dn.render.iptables import Ruleset
from policies import validators as v

HOST = parse_host({"name": "eu1", "admin_sources": ["192.0.2.10/32", "2001:db8:aa::/48"], "ssh_port": 2222})


def tenant(**kw):
    data = {"slug": "acme", "domains": ["gtm.acme.example"], "image": "dn.local/sgtm-standin:1",
            "subnet": "10.210.0.0/28", **kw}
    return parse_tenant(data, plans={"standard": PlanConfig(), "noburst": PlanConfig(burst_per_ip=0)},
                        host_view=True)


# --------------------------------------------------------------------------- firewall


def test_baseline_exposes_only_80_and_443():
    assert v.public_exposure(fw.baseline_rulesets(HOST), HOST.ssh_port) == []


def _with_rule(rs: Ruleset, rule: tuple[str, ...]) -> Ruleset:
    return Ruleset(rs.family, rs.chains, rs.rules + (("DN-INPUT", rule),), rs.ensure, rs.hooks, rs.policies)


@pytest.mark.parametrize("rule, port", [
    (("-p", "tcp", "-m", "tcp", "--dport", "2222", "-j", "ACCEPT"), 2222),  # SSH for everyone
    (("-p", "tcp", "-m", "multiport", "--dports", "80,443,5432", "-j", "ACCEPT"), 5432),
    (("-p", "tcp", "-j", "ACCEPT"), 1),  # everything
])
def test_a_public_port_beyond_80_443_is_named(rule, port):
    v4, v6 = fw.baseline_rulesets(HOST)
    problems = v.public_exposure([_with_rule(v4, rule), v6], HOST.ssh_port)
    assert len(problems) == 1 and problems[0].startswith("IPv4 tcp open to the internet")
    assert str(port) in problems[0]


def test_udp_open_and_accept_policy_are_named():
    v4, v6 = fw.baseline_rulesets(HOST)
    udp = _with_rule(v6, ("-p", "udp", "-m", "udp", "--dport", "53", "-j", "ACCEPT"))
    assert v.public_exposure([v4, udp]) == ["IPv6 udp open to the internet: [53]; only nothing may be"]
    lax = Ruleset(v4.family, v4.chains, v4.rules, v4.ensure, v4.hooks, (("INPUT", "ACCEPT"), ("FORWARD", "DROP")))
    assert "IPv4 INPUT policy must be DROP" in v.public_exposure([lax, v6])


def test_admin_ssh_is_not_public():
    # the admin rule accepts only from its sources: an internet address gets nothing on 2222
    v4, _ = fw.baseline_rulesets(HOST)
    assert any("--dport" in r and "2222" in r and "-s" in r for _c, r in v4.rules)
    assert v.public_exposure([v4], HOST.ssh_port) == []


# --------------------------------------------------------------------------- nginx


def test_dns_own_nginx_config_passes():
    t = tenant()
    assert v.nginx_tls(rn.render_base(HOST), base=True) == []
    vhost = {rn.vhost_path(HOST, t): rn.render_vhost(t, HOST)}
    assert v.nginx_tls(vhost, base=False) == []
    assert v.nginx_rate_limits(vhost) == []
    no_burst = tenant(plan="noburst")
    assert v.nginx_rate_limits({"x.conf": rn.render_vhost(no_burst, HOST)}) == []


def test_tls_protocols_and_hsts_breaks_are_named():
    base = rn.render_base(HOST)
    conf = rn.NGINX_CONF
    path = HOST.path(conf)
    old = {path: base[path].replace("ssl_protocols TLSv1.2 TLSv1.3;", "ssl_protocols TLSv1 TLSv1.2 TLSv1.3;")}
    assert v.nginx_tls(old, base=True) == [f"{path}: ssl_protocols TLSv1 TLSv1.2 TLSv1.3; only TLSv1.2 TLSv1.3 are allowed"]
    gone = {path: base[path].replace("ssl_protocols TLSv1.2 TLSv1.3;", "")}
    assert v.nginx_tls(gone, base=True) == [f"{path}: no ssl_protocols (TLSv1.2 TLSv1.3 required)"]

    t = tenant()
    text = rn.render_vhost(t, HOST)
    hsts = f'add_header Strict-Transport-Security "max-age={HOST.hsts_max_age}; includeSubDomains" always;'
    assert text.count(hsts) == 2  # the server and the preview location (its own add_header)
    short = text.replace(f"max-age={HOST.hsts_max_age}", "max-age=86400")
    assert v.nginx_tls({"v.conf": short}, base=False) == [
        "v.conf: server: HSTS max-age must be at least 63072000 s",
        "v.conf: location ^~ /_dn/preview/: HSTS max-age must be at least 63072000 s"]
    not_always = text.replace("includeSubDomains\" always;", "includeSubDomains\";", 1)
    assert v.nginx_tls({"v.conf": not_always}, base=False) == ["v.conf: server: HSTS must be sent 'always' (also on errors)"]
    # the location's own add_header replaces the server's: without HSTS there, previews lose it
    dropped = text[::-1].replace(hsts[::-1], "", 1)[::-1]
    assert v.nginx_tls({"v.conf": dropped}, base=False) == [
        "v.conf: location ^~ /_dn/preview/ on 443 sends no Strict-Transport-Security"]


def test_rate_limit_breaks_are_named():
    t = tenant()
    text = rn.render_vhost(t, HOST)
    z = t.zones
    host_keyed = text.replace(f"limit_req_zone {z.tenant_key} ", "limit_req_zone $host ")
    problems = v.nginx_rate_limits({"v.conf": host_keyed})
    assert "v.conf: a request zone is keyed on a client-chosen host name" in problems
    assert "v.conf: no per-tenant request zone keyed on a constant" in problems
    unused = "\n".join(ln for ln in text.splitlines() if not ln.strip().startswith(f"limit_req zone={z.req_ip}"))
    assert v.nginx_rate_limits({"v.conf": unused}) == ["v.conf: the 443 server does not apply a per-IP rate limit"]
    no_conn = "\n".join(ln for ln in text.splitlines() if not ln.strip().startswith("limit_conn "))
    assert v.nginx_rate_limits({"v.conf": no_conn}) == ["v.conf: the 443 server does not limit connections per IP"]


# --------------------------------------------------------------------------- resources


def _res(name: str, **props) -> v.Resource:
    return v.Resource("pulumi-python:dynamic:Resource", name, props)


def test_resources_are_recognised_by_kind():
    host = HOST.model_dump(mode="json")
    t = host_view_data(tenant())
    assert v.is_firewall_baseline(_res("eu1-firewall-baseline", host=host))
    assert not v.is_firewall_baseline(_res("acme-firewall", host=host, tenant=t))
    assert v.is_vhost(_res("acme-nginx-vhost", host=host, tenant=t))
    assert v.is_nginx(_res("eu1-nginx-base", host=host)) and not v.is_vhost(_res("eu1-nginx-base", host=host))
    assert v.is_volume(_res("acme-luks-volume", host=host, tenant=t, key="k"))
    assert v.is_backup_timer(_res("acme-backup-timer", host=host, tenant=t, unit="dn-backup-acme"))
    assert v.is_backup_timer(_res("eu1-timer-dn-backup-platform", host=host, unit="dn-backup-platform"))
    assert not v.is_backup_timer(_res("eu1-timer-dn-health", host=host, unit="dn-health"))


def test_backup_schedule_rules():
    host = HOST.model_dump(mode="json")
    daily = _res("eu1-timer-dn-backup-platform", host=host, unit="dn-backup-platform",
                 schedules={"backup": "*-*-* 02:30:00"})
    assert v.validate(daily) == []
    weekly = _res("eu1-timer-dn-backup-platform", host=host, unit="dn-backup-platform",
                  schedules={"backup": "Sun *-*-* 02:30:00"})
    assert [str(x) for x in v.validate(weekly)] == [
        "dn-backup-schedule (eu1-timer-dn-backup-platform): dn-backup-platform: schedule 'Sun *-*-* 02:30:00' "
        "does not run every day (RPO 24 h)"]
    short = v.validate(daily, v.Config(retention_days=7))
    assert [x.message for x in short] == ["dn-backup-platform: backups are kept 7 days; at least 30 required"]


def test_luks_rules():
    host = HOST.model_dump(mode="json")
    vol = _res("acme-luks-volume", host=host, tenant=host_view_data(tenant()), key="[secret]")
    assert v.validate(vol) == []
    seen = _res("acme-luks-volume", host=host, tenant=host_view_data(tenant()), key="k",
                header={"cipher": "aes-cbc-essiv:sha256", "key_bits": 256})
    assert sorted(x.message for x in v.validate(seen)) == [
        "the volume's header says a 256-bit key", "the volume's header says cipher aes-cbc-essiv:sha256"]
    keyless = _res("acme-luks-volume", host=host, tenant=host_view_data(tenant()))
    assert [x.message for x in v.validate(keyless)] == ["has no key input"]


def test_unparseable_inputs_are_violations_not_crashes():
    bad = _res("acme-nginx-vhost", host={"name": "eu1"}, tenant={"slug": "acme"})
    found = v.validate(bad)
    assert {x.policy for x in found} == {"dn-tls-hsts", "dn-rate-limits"}
    assert all(x.message.startswith("cannot be checked: host.admin_sources") for x in found)


def test_container_views_of_both_backends_agree():
    from dn.host import docker as hd

    t = parse_tenant({"slug": "acme", "domains": ["gtm.acme.example"], "image": "dn.local/sgtm-standin:1",
                      "subnet": "10.210.0.0/28", "container_config": "Q09OVEFJTkVSX0NPTkZJRw=="},
                     plans={"standard": PlanConfig()})
    dyn = v.Resource("pulumi-python:dynamic:Resource", "acme-tagging", hd.tenant_container_inputs(t, "tagging"))
    assert v.is_container(dyn) and v.validate(dyn) == []
    wide = v.Resource(dyn.type, dyn.name, {**dyn.props, "image": "quay.io/evil/sgtm:1"})
    assert [x.policy for x in v.validate(wide)] == ["dn-allowed-registries"]
    allowed = v.validate(wide, v.Config(allowed_registries=("quay.io/evil/",)))
    assert allowed == []
    broken = v.Resource(dyn.type, dyn.name, {**dyn.props, "memory_mb": "lots"})
    assert {x.policy for x in v.validate(broken)} == {"dn-no-published-ports", "dn-container-hardening",
                                                      "dn-allowed-registries"}


def test_inputs_from_the_policy_sdk_are_made_plain():
    """The analyzer hands resources over as read-only proxies with secrets unwrapped; the
    validators see plain data (found when the real engine ran the pack on a LUKS volume)."""
    from pulumi_policy.deserialize import deserialize_properties

    host = HOST.model_dump(mode="json")
    wire = {"host": host, "tenant": host_view_data(tenant()),
            "key": {"4dabf18193072939515e22adb298388d": "1b47061264138c4ac30d75fd1eb44270", "value": "a2V5"}}
    proxied = deserialize_properties(wire, proxy_secrets=True)
    assert not isinstance(proxied["tenant"]["domains"], list)  # what parse_tenant would refuse
    res = v.Resource("pulumi-python:dynamic:Resource", "acme-luks-volume", v.plain(proxied))
    assert res.props["key"] == "a2V5" and res.props["tenant"]["domains"] == ["gtm.acme.example"]
    assert v.validate(res) == []
