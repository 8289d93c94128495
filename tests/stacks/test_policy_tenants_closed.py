"""dn-tenants-closed: the host baseline's rendered rules drop tenant bridges by default (pure)."""
from __future__ import annotations

import pytest

from dn.models import parse_host
from dn.render import iptables as ipt
from policies import validators as v

HOST = {"name": "eu1", "admin_sources": ["10.231.1.1/32"]}


def _baseline_resource() -> v.Resource:
    return v.Resource("pulumi-python:dynamic:Resource", "eu1-firewall-baseline",
                      {"host": parse_host(HOST).model_dump(mode="json"), "ssh": {}})


def test_the_rendered_baseline_passes():
    r = _baseline_resource()
    assert v.policy("dn-tenants-closed").applies(r)
    assert [x for x in v.validate(r) if x.policy == "dn-tenants-closed"] == []


def test_a_baseline_without_the_default_drop_is_a_violation(monkeypatch):
    real = ipt.render_baseline

    def without_tail(host):
        out = real(host)
        from dataclasses import replace

        return {**out, 4: replace(out[4], tails=())}

    monkeypatch.setattr(ipt, "render_baseline", without_tail)
    monkeypatch.setattr("dn.host.firewall.render_baseline", without_tail)
    found = [x for x in v.validate(_baseline_resource()) if x.policy == "dn-tenants-closed"]
    assert found and "does not end in the drop" in found[0].message


@pytest.mark.parametrize("family", [4, 6])
def test_a_baseline_letting_tenant_bridges_through_is_a_violation(monkeypatch, family):
    real = ipt.render_baseline

    def opened(host):
        out = real(host)
        from dataclasses import replace

        chain = "DN-INPUT"
        rules = tuple(r for r in out[family].rules if not (r[0] == chain and r[1][:2] == ("-i", "dnt+")
                                                          and r[1][-1] == "DROP"))
        return {**out, family: replace(out[family], rules=rules)}

    monkeypatch.setattr("dn.host.firewall.render_baseline", opened)
    assert [x for x in v.validate(_baseline_resource()) if x.policy == "dn-tenants-closed"]
