"""Pulumi dynamic resources for nginx on an EU host: ``NginxBase`` (host stack) and
``NginxVhost`` (tenant stack), thin wrappers over ``dn.host.nginx`` (see ``common`` for the
conventions).

Outputs: the inputs plus ``digest``, the digest of the unit's files as last applied, or as read
back by a refresh when nginx serves exactly them; anything else (a file edited on the host, a
load never completed, nginx stopped) reads as a different digest, so the next ``up`` re-applies.
A changed host prefix replaces the resource (its files live elsewhere), as does a changed tenant
slug for a vhost (another file).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pulumi
from pulumi.dynamic import ReadResult, Resource

from dn.host import nginx as hn
from dn.host.plan import digest
from stacks.providers import common as c

OUTPUTS = ("digest", "files")


def _served_digest(unit: hn.Unit, state: hn.NginxState) -> str:
    on_host = digest(state.files)
    if state.master is None:
        return "not-running:" + on_host
    if state.loaded != on_host:
        return "not-loaded:" + on_host
    return on_host


class _NginxProvider(c.DigestProvider):
    outputs = OUTPUTS
    delete_before_replace = False

    def render(self, props: Mapping[str, Any]) -> hn.Unit:
        raise NotImplementedError

    def wanted(self, props: Mapping[str, Any]) -> str:
        return self.render(props).digest

    def apply(self, session, props: Mapping[str, Any]) -> dict[str, Any]:
        unit = self.render(props)
        hn.converge(session, c.host(props), unit)
        return {"files": sorted(unit.files)}

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        unit = self.render(props)
        with c.state_session(props) as s:
            state = hn.read(s, c.host(props), unit)
        if all(v is None for v in state.files.values()):
            return ReadResult(id_=None, outs={})
        return ReadResult(id_=id_, outs=self.outs(props, _served_digest(unit, state), {"files": sorted(unit.files)}))


class NginxBaseProvider(_NginxProvider):
    """Provider of :class:`NginxBase`."""

    def render(self, props: Mapping[str, Any]) -> hn.Unit:
        return hn.base_unit(c.host(props))

    def resource_id(self, props: Mapping[str, Any]) -> str:
        h = c.host(props)
        return f"{h.name}:nginx-base"

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        with c.state_session(props) as s:
            hn.remove_base(s, c.host(props))


class NginxVhostProvider(_NginxProvider):
    """Provider of :class:`NginxVhost`."""

    replace_slugs = ("tenant",)

    def render(self, props: Mapping[str, Any]) -> hn.Unit:
        return hn.vhost_unit(c.host(props), c.tenant(props))

    def resource_id(self, props: Mapping[str, Any]) -> str:
        return f"{c.host(props).name}:nginx-vhost:{c.tenant(props).slug}"

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        with c.state_session(props) as s:
            hn.remove_vhost(s, c.host(props), c.tenant(props))


class NginxBase(Resource):
    """The host's nginx main config and DH group, nginx running on them (host baseline stack)."""

    digest: pulumi.Output[str]
    files: pulumi.Output[list]

    def __init__(self, resource_name: str, *, ssh: pulumi.Input[Mapping[str, Any]],
                 host: pulumi.Input[Mapping[str, Any]], opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(NginxBaseProvider(), resource_name,
                         {"ssh": ssh, "host": host, "digest": None, "files": None}, opts)


class NginxVhost(Resource):
    """One tenant's vhost (its rate-limit zones and servers), loaded by nginx (tenant stack).
    The tenant's certificate must be in the host's cert dir and the base config applied."""

    digest: pulumi.Output[str]
    files: pulumi.Output[list]

    def __init__(self, resource_name: str, *, ssh: pulumi.Input[Mapping[str, Any]],
                 host: pulumi.Input[Mapping[str, Any]], tenant: pulumi.Input[Mapping[str, Any]],
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(NginxVhostProvider(), resource_name,
                         {"ssh": ssh, "host": host, "tenant": tenant, "digest": None, "files": None}, opts)
