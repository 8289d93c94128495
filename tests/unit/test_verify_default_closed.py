"""net.tenant-default-closed: read from rules as dn's real renderer leaves a Docker host (pure)."""
from __future__ import annotations

import pytest

from dn.models import parse_host
from dn.render.iptables import TENANTS_DEFAULT_DROP, apply_restore, combined_restore_text, parse_save, render_baseline
from dn.verify.network import default_closed_findings
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
