"""Pulumi dynamic resources for a tenant's Docker network and sGTM containers, over dn's SSH layer.

``DockerNetwork`` and ``DockerContainer`` are the ``dn-ssh`` docker backend: tenant stacks use
them instead of pulumi-docker's ``Network``/``Container`` when the pulumi-docker provider plugin
is not installed (:func:`docker_backend`, override ``DN_DOCKER_BACKEND``). The work is done by
``dn.host.docker`` (argv, Engine API body, inspect parsing, plans, deploy with rollback); these
classes only map Pulumi's provider protocol onto it.

Conventions (the engine pickles providers with dill and runs them in its own process):

- No connection or key object lives on a provider: every method opens its own SSH session to the
  host as the current configuration has it (``stacks.providers.common``: ``read`` and ``delete``
  never connect with the ``ssh`` recorded in the state, whose pin may have been replaced or
  revoked since). A change of ``ssh`` alone is not a change of the resource.
- ``secret_env`` (CONTAINER_CONFIG) must be a Pulumi secret. The provider receives it in plain text
  (dynamic providers do not accept secrets), sends it to the daemon only on the SSH channel's
  stdin, and never returns it: outputs carry the other inputs plus ``observed``, the normalized
  ``docker inspect`` in which secret env values are SHA-256 digests. So the secret is neither in
  any output nor in any error message.
- ``create``/``update`` return the inputs (minus the secret) in outputs; ``diff`` compares the
  spec built from the new inputs with the *observed* output (what the host had at the last
  create, update or refresh), so drift found by ``read`` (``pulumi refresh``) shows as a change
  at the next ``up`` and is repaired by it.

Diffs: a network difference of any kind replaces the network (Docker networks are immutable),
deleting first (the name, bridge and subnet cannot exist twice). A container's name or network
change replaces it (deleting first: the fixed address cannot be held twice); any other difference
recreates it in place with a health gate and rollback (``dn.host.docker.deploy_container``).
When a replaced network's name is still unknown during a preview, the containers on it are
replaced too, so pass ``network=<DockerNetwork>.name`` to make that dependency known.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pulumi
from pulumi.dynamic import (
    CheckFailure,
    CheckResult,
    CreateResult,
    DiffResult,
    ReadResult,
    Resource,
    ResourceProvider,
    UpdateResult,
)

from dn.errors import InvalidInput
from dn.host import docker as hd
from dn.host.docker import docker_backend  # re-exported: tenant stacks choose their backend with it
from dn.models import TenantSpec
from stacks.providers import common as c

__all__ = ["DockerContainer", "DockerContainerProvider", "DockerNetwork", "DockerNetworkProvider",
           "docker_backend", "tenant_docker"]

OUTPUT_KEYS = ("observed", "network_id", "container_id")
SECRET_KEY = "secret_env"
NETWORK_INPUTS = ("name", "tenant", "bridge", "subnet", "gateway", "labels")


def _failures(fn, *args) -> list[CheckFailure]:
    try:
        fn(*args)
    except InvalidInput as e:
        return [CheckFailure(e.field, e.rule)]
    return []


def _inputs(props: Mapping[str, Any]) -> dict[str, Any]:
    """The inputs worth keeping in outputs: everything but the secret and previous outputs."""
    return {k: v for k, v in props.items() if k != SECRET_KEY and k not in OUTPUT_KEYS}


# --------------------------------------------------------------------------- network


class DockerNetworkProvider(ResourceProvider):
    """Provider of :class:`DockerNetwork` (see the module docstring)."""

    def check(self, _olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        if c.has_unknown(news):
            return CheckResult(news, [])
        failures = _failures(hd.network_spec, news) or _failures(c.target, news)
        return CheckResult(news, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        if c.has_unknown({k: news.get(k) for k in NETWORK_INPUTS}):
            changed = [k for k in NETWORK_INPUTS if c.has_unknown(news.get(k)) or olds.get(k) != news.get(k)]
            return DiffResult(changes=bool(changed), replaces=changed, delete_before_replace=True)
        spec = hd.network_spec(news)
        plan = hd.plan_network(spec, olds.get("observed"))
        replaces = sorted({ch.target for ch in plan.changes})
        return DiffResult(changes=bool(replaces), replaces=replaces, delete_before_replace=True)

    def create(self, props: dict[str, Any]) -> CreateResult:
        spec = hd.network_spec(props)
        with c.session(props) as s:
            _plan, live = hd.ensure_network(s, spec)
        return CreateResult(id_=spec.name, outs={**_inputs(props), "network_id": live["id"], "observed": live})

    def update(self, _id: str, _olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        # Only reached when nothing of the network itself changed (diff replaces otherwise):
        # make sure it is still there and as declared.
        spec = hd.network_spec(news)
        with c.session(news) as s:
            _plan, live = hd.ensure_network(s, spec)
        return UpdateResult(outs={**_inputs(news), "network_id": live["id"], "observed": live})

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        with c.state_session(props) as s:
            hd.remove_network(s, props.get("name") or id_)

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        with c.state_session(props) as s:
            live = hd.read_network(s, id_)
        if live is None:
            return ReadResult(id_=None, outs={})  # gone: a refresh drops it from the state
        return ReadResult(id_=id_, outs={**_inputs(props), "network_id": live["id"], "observed": live})


class DockerNetwork(Resource):
    """A tenant's Docker bridge network on its EU host, managed over SSH (``dn-ssh`` backend):
    fixed bridge name, inter-container traffic off, fixed subnet and gateway, dn's labels."""

    name: pulumi.Output[str]
    network_id: pulumi.Output[str]
    observed: pulumi.Output[dict]

    def __init__(self, resource_name: str, *, ssh: pulumi.Input[Mapping[str, Any]], name: pulumi.Input[str],
                 tenant: pulumi.Input[str], bridge: pulumi.Input[str], subnet: pulumi.Input[str],
                 gateway: pulumi.Input[str], labels: pulumi.Input[Mapping[str, str]] | None = None,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        props = {"ssh": ssh, "name": name, "tenant": tenant, "bridge": bridge, "subnet": subnet,
                 "gateway": gateway, "labels": labels or {}, "network_id": None, "observed": None}
        super().__init__(DockerNetworkProvider(), resource_name, props, opts)


# --------------------------------------------------------------------------- container


def _container(props: Mapping[str, Any]) -> tuple[hd.ContainerSpec, dict[str, str]]:
    spec = hd.container_spec(props)
    return spec, hd.check_secret_env(spec, props.get(SECRET_KEY) or {})


def _container_outs(props: Mapping[str, Any], observed: dict) -> dict[str, Any]:
    return {**_inputs(props), "container_id": observed["id"], "observed": observed}


class DockerContainerProvider(ResourceProvider):
    """Provider of :class:`DockerContainer` (see the module docstring)."""

    def check(self, _olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        if c.has_unknown(news):
            return CheckResult(news, [])
        failures = _failures(_container, news) or _failures(c.target, news)
        return CheckResult(news, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        replaces = [k for k in ("name", "network") if c.has_unknown(news.get(k)) or olds.get(k) != news.get(k)]
        if c.has_unknown({k: v for k, v in news.items() if k != "ssh"}):
            return DiffResult(changes=True, replaces=replaces, delete_before_replace=True)
        spec, secret = _container(news)
        plan = hd.plan_container(spec, hd.secret_digests(secret), olds.get("observed"))
        changed = bool(plan.changes) or bool(replaces)
        return DiffResult(changes=changed, replaces=replaces, delete_before_replace=True)

    def _deploy(self, props: Mapping[str, Any]) -> dict[str, Any]:
        spec, secret = _container(props)
        with c.session(props) as s:
            done = hd.deploy_container(s, spec, secret)
        return _container_outs(props, done.observed)

    def create(self, props: dict[str, Any]) -> CreateResult:
        outs = self._deploy(props)
        return CreateResult(id_=props["name"], outs=outs)

    def update(self, _id: str, _olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        return UpdateResult(outs=self._deploy(news))

    def delete(self, id_: str, props: dict[str, Any]) -> None:
        with c.state_session(props) as s:
            hd.remove_container(s, props.get("name") or id_)

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        keys = props.get("secret_env_keys") or hd.SECRET_ENV_DEFAULT
        with c.state_session(props) as s:
            live = hd.read_container(s, id_, keys)
        if live is None:
            return ReadResult(id_=None, outs={})
        return ReadResult(id_=id_, outs=_container_outs(props, live))


class DockerContainer(Resource):
    """A tenant's sGTM tagging or preview container, managed over SSH (``dn-ssh`` backend).

    Inputs as in ``dn.host.docker.container_spec`` (``dn.host.docker.tenant_container_inputs``
    builds them from a TenantSpec) plus ``ssh`` and ``secret_env`` (made a Pulumi secret here)."""

    name: pulumi.Output[str]
    container_id: pulumi.Output[str]
    observed: pulumi.Output[dict]

    def __init__(self, resource_name: str, *, ssh: pulumi.Input[Mapping[str, Any]],
                 secret_env: pulumi.Input[Mapping[str, str]], opts: pulumi.ResourceOptions | None = None,
                 **inputs: Any) -> None:
        unknown = sorted(set(inputs) - hd.CONTAINER_FIELDS)
        if unknown:
            raise InvalidInput(unknown[0], "unknown DockerContainer input")
        props = {**inputs, "ssh": ssh, SECRET_KEY: pulumi.Output.secret(secret_env),
                 "container_id": None, "observed": None}
        super().__init__(DockerContainerProvider(), resource_name, props, opts)


# --------------------------------------------------------------------------- a tenant's set


def tenant_docker(tenant: TenantSpec, ssh: Mapping[str, Any], container_config: pulumi.Input[str], *,
                  name: Any = None, health_test: Sequence[str] | None = None,
                  opts: pulumi.ResourceOptions | None = None,
                  **container_extra: Any) -> tuple[DockerNetwork, list[DockerContainer]]:
    """The tenant's network and its tagging (and, with ``tenant.preview``, preview) container.

    ``name(suffix)`` names the Pulumi resources (default ``<slug>-<suffix>``); ``container_config``
    should be a secret Output (it is made one anyway). The containers depend on the network
    through its ``name`` output."""
    res_name = name or (lambda suffix: f"{tenant.slug}-{suffix}")
    net = DockerNetwork(res_name("network"), ssh=ssh, opts=opts, **hd.tenant_network_inputs(tenant))
    secret_env = pulumi.Output.secret(container_config).apply(lambda cfg: {"CONTAINER_CONFIG": cfg})
    containers = []
    for role in ("tagging", "preview") if tenant.preview else ("tagging",):
        inputs = hd.tenant_container_inputs(tenant, role, health_test=health_test, **container_extra)
        inputs["network"] = net.name
        containers.append(DockerContainer(res_name(role), ssh=ssh, secret_env=secret_env, opts=opts, **inputs))
    return net, containers
