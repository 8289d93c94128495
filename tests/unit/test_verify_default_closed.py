"""net.tenant-default-closed: read from rules as dn's real renderer leaves a Docker host (pure)."""
from __future__ import annotations

import pytest

from dn.models import parse_host
from dn.render.iptables import (
    TENANTS_DEFAULT_DROP,
    apply_restore,
    combined_restore_text,
    default_closed_findings,
    parse_save,
    render_baseline,
)
from tests.unit.test_host_plans import DOCKER_ONLY
from tests.unit.test_render_iptables import tenant

HOST = parse_host({"name": "eu1", "admin_sources": ["10.231.1.1/32"]})


def tables(with_tenant: bool = True):
    base = render_baseline(HOST)
    sets = [base[4]]
    if with_tenant:
        from dn.render.iptables import render_tenants

        sets += render_tenants([tenant("acme")], HOST)
    current = parse_save(DOCKER_ONLY)
    v4 = apply_restore(current, combined_restore_text(sets, current))
    v6 = apply_restore({}, base[6].restore_text({}))
    return v4, v6


@pytest.mark.parametrize("with_tenant", [True, False])
def test_the_rendered_baseline_is_closed_by_default(with_tenant):
    v4, v6 = tables(with_tenant)
    fails, ev = default_closed_findings(v4, v6)
    assert fails == [] and any("ends in" in e for e in ev)


def _break(v4, v6, how):
    if how == "no tail":  # the baseline as it was before the default drop
        v4.rules["DN-TENANTS-FWD"].remove(TENANTS_DEFAULT_DROP)
    elif how == "returning hook":  # a tenant hooked with -j: its RETURN would fall into the drop (or worse, past it)
        v4.rules["DN-TENANTS-FWD"].insert(0, ("-i", "dnt+", "-j", "ACCEPT"))
    elif how == "docker-user not first":
        v4.rules["DOCKER-USER"].insert(0, ("-i", "dntx", "-j", "ACCEPT"))
    elif how == "forward accepts first":
        v4.rules["FORWARD"].insert(0, ("-i", "dnt0123", "!", "-o", "dnt0123", "-j", "ACCEPT"))
    elif how == "no dn hook in docker-user":
        v4.rules["DOCKER-USER"] = [("-j", "RETURN")]
    elif how == "ipv6 open":
        v6.rules["DN-FORWARD"] = []
    elif how == "forward policy":
        v4.policies["FORWARD"] = "ACCEPT"
    elif how == "input dispatch open":
        v4.rules["DN-TENANTS-IN"].insert(0, ("-i", "dnt+", "-j", "ACCEPT"))
    return v4, v6


@pytest.mark.parametrize("how", ["no tail", "returning hook", "docker-user not first", "forward accepts first",
                                 "no dn hook in docker-user", "ipv6 open", "forward policy", "input dispatch open"])
def test_each_way_of_failing_open_is_found(how):
    fails, _ = default_closed_findings(*_break(*tables(), how))
    assert fails, how


def test_nothing_read_is_not_a_pass():
    from dn.render.iptables import SavedTable

    fails, _ = default_closed_findings(SavedTable(), SavedTable())
    assert fails


def _state(v4_save: str, v6_save: str = ""):
    from dn.host.firewall import FirewallState

    return FirewallState(saved={4: v4_save, 6: v6_save}, tables={4: parse_save(v4_save), 6: parse_save(v6_save)})


def test_a_tenant_firewall_is_refused_on_a_host_without_the_baseline():
    """Without the baseline nothing enters DN-TENANTS-FWD: the tenant's chains would hook into
    nothing and its containers would reach everything, so the tenant apply is refused."""
    from dn.host.firewall import baseline_refusal, tenant_rulesets

    why = baseline_refusal(tenant_rulesets(HOST, tenant("acme")), _state(DOCKER_ONLY))
    assert why and "dn host up" in why and "DN-TENANTS-FWD" in why


def test_a_tenant_firewall_is_accepted_inside_the_baseline():
    from dn.host.firewall import FirewallState, baseline_refusal, tenant_rulesets

    v4, v6 = tables(with_tenant=False)
    state = FirewallState(saved={4: "", 6: ""}, tables={4: {"filter": v4}, 6: {"filter": v6}})
    assert baseline_refusal(tenant_rulesets(HOST, tenant("acme")), state) is None
