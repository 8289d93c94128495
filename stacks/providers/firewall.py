"""Pulumi dynamic resources for the host firewall: ``FirewallBaseline`` (host stack, IPv4 and
IPv6) and ``TenantFirewall`` (a tenant's chains, tenant stack), thin wrappers over
``dn.host.firewall`` (see ``common`` for the conventions).

Outputs: the inputs plus ``digest`` (of the rendered rules, as applied; a refresh that finds the
live rules differ, e.g. a rule added by hand or a hook missing, records ``drift:...`` instead,
so the next ``up`` re-applies) and ``drift`` (what differs, empty when in place). An apply that
would lock dn out of the host is refused (the engine reports the PolicyViolation); a failed apply
puts back what it changed (``dn.host.firewall``). A tenant's slug change replaces its chains.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pulumi
from pulumi.dynamic import ReadResult, Resource

from dn.errors import InvalidInput
from dn.host import firewall as fw
from dn.host.plan import digest
from dn.render.iptables import Ruleset, SavedTable
from stacks.providers import common as c

OUTPUTS = ("digest", "drift")


def rules_digest(rulesets: Sequence[Ruleset]) -> str:
    """A digest of what dn renders for ``rulesets`` (chains, rules, hooks, policies)."""
    return digest({f"{i}:{r.family}": repr(r).encode() for i, r in enumerate(rulesets)})


def _present(rulesets: Sequence[Ruleset], state: fw.FirewallState) -> bool:
    for r in rulesets:
        table = state.tables.get(r.family, {}).get("filter", SavedTable())
        if any(ch in table.policies for ch in r.chains):
            return True
    return False


class _FirewallProvider(c.DigestProvider):
    outputs = OUTPUTS
    files_on_host = False  # rules live in the kernel, not under the host prefix
    delete_before_replace = True  # a tenant's new chains would hook the same bridge twice otherwise

    def render(self, props: Mapping[str, Any]) -> list[Ruleset]:
        raise NotImplementedError

    def wanted(self, props: Mapping[str, Any]) -> str:
        return rules_digest(self.render(props))

    def apply(self, session, props: Mapping[str, Any]) -> dict[str, Any]:
        self.converge(session, props)
        return {"drift": []}

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        rulesets = self.render(props)
        with c.state_session(props) as s:
            state = fw.read(s)
        if not _present(rulesets, state):
            return ReadResult(id_=None, outs={})
        drift = [f"IPv{r.family} {d}" for r in rulesets for d in r.drift(state.tables.get(r.family, {}))]
        the_digest = rules_digest(rulesets) if not drift else "drift:" + digest({"drift": "\n".join(drift).encode()})
        return ReadResult(id_=id_, outs=self.outs(props, the_digest, {"drift": drift}))

    def converge(self, s, props: Mapping[str, Any]) -> None:
        raise NotImplementedError


class FirewallBaselineProvider(_FirewallProvider):
    """Provider of :class:`FirewallBaseline`."""

    def render(self, props: Mapping[str, Any]) -> list[Ruleset]:
        return fw.baseline_rulesets(c.host(props))

    def converge(self, s, props: Mapping[str, Any]) -> None:
        fw.converge_baseline(s, c.host(props))

    def resource_id(self, props: Mapping[str, Any]) -> str:
        return f"{c.host(props).name}:firewall-baseline"

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        with c.state_session(props) as s:
            fw.remove_baseline(s, c.host(props))


def _bridges(props: Mapping[str, Any]) -> list[str]:
    value = props.get("other_bridges") or []
    if not isinstance(value, (list, tuple)) or not all(isinstance(b, str) for b in value):
        raise InvalidInput("other_bridges", "must be a list of interface names")
    return list(value)


class TenantFirewallProvider(_FirewallProvider):
    """Provider of :class:`TenantFirewall`."""

    replace_slugs = ("tenant",)

    def render(self, props: Mapping[str, Any]) -> list[Ruleset]:
        return fw.tenant_rulesets(c.host(props), c.tenant(props), _bridges(props))

    def converge(self, s, props: Mapping[str, Any]) -> None:
        fw.converge_tenant(s, c.host(props), c.tenant(props), extra_bridges=_bridges(props))

    def resource_id(self, props: Mapping[str, Any]) -> str:
        return f"{c.host(props).name}:firewall:{c.tenant(props).slug}"

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        with c.state_session(props) as s:
            fw.remove_tenant(s, c.host(props), c.tenant(props))


class FirewallBaseline(Resource):
    """The host's firewall baseline, IPv4 and IPv6: INPUT/FORWARD DROP, only 80/443 public, SSH
    from the admin sources, tenant bridges kept off host services (host baseline stack)."""

    digest: pulumi.Output[str]
    drift: pulumi.Output[list]

    def __init__(self, resource_name: str, *, ssh: pulumi.Input[Mapping[str, Any]],
                 host: pulumi.Input[Mapping[str, Any]], opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(FirewallBaselineProvider(), resource_name,
                         {"ssh": ssh, "host": host, "digest": None, "drift": None}, opts)


class TenantFirewall(Resource):
    """One tenant's chains: no forwarding to other tenants' bridges, docker0 or private ranges; no
    host service but nginx (and the host's ``tenant_host_services``). Create it before the
    tenant's Docker network and containers, which depend on it (tenant stack): it matches the
    bridge by name, and until it is in place the baseline drops everything from the bridge."""

    digest: pulumi.Output[str]
    drift: pulumi.Output[list]

    def __init__(self, resource_name: str, *, ssh: pulumi.Input[Mapping[str, Any]],
                 host: pulumi.Input[Mapping[str, Any]], tenant: pulumi.Input[Mapping[str, Any]],
                 other_bridges: pulumi.Input[Sequence[str]] | None = None,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(TenantFirewallProvider(), resource_name,
                         {"ssh": ssh, "host": host, "tenant": tenant, "other_bridges": other_bridges or [],
                          "digest": None, "drift": None}, opts)
