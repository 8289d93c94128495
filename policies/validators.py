"""dn's policies as plain functions: each takes one resource (type, name, inputs) and returns
the violations it finds, as messages. Pure; no pulumi import.

The CrossGuard pack (``policies/__main__.py``) runs them in the Pulumi engine on every preview and
up; the test suite runs the same functions over every resource the tenant and host programs
register under Pulumi's mocks. One policy per promise of the trust page:

========================  ====================================================================
policy                    rule
========================  ====================================================================
dn-no-published-ports     no container publishes a port (only nginx is public)
dn-container-hardening    every capability dropped (NET_RAW too), no-new-privileges, not
                          privileged, memory limited, rotated logs, a health check
dn-network-icc-disabled   every tenant network: a bridge named ``dnt…``, inter-container
                          traffic disabled
dn-allowed-registries     images only from the allowed registries
dn-baseline-public-ports  the firewall baseline opens exactly 80 and 443 to the world
dn-tls-hsts               nginx: TLS 1.2/1.3 only, HSTS max-age ≥ 2 years (base and vhosts)
dn-rate-limits            every vhost limits requests per IP and per tenant and connections
dn-luks                   LUKS2, aes-xts-plain64, a 512-bit key
dn-backup-schedule        a valid backup schedule and a retention of at least 30 days
========================  ====================================================================

Resources are recognised by type (docker) or, for dn's dynamic resources, by the kind
``dn.preview.kind_of`` reads from their type or name.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dn.preview import kind_of

CONTAINER = "docker:index/container:Container"
NETWORK = "docker:index/network:Network"
ICC_OPTION = "com.docker.network.bridge.enable_icc"
BRIDGE_OPTION = "com.docker.network.bridge.name"
DEFAULT_REGISTRIES = ("gcr.io/cloud-tagging-10302018/", "dn.local/")
MIN_HSTS = 63_072_000  # two years, in seconds
LUKS_CIPHER = "aes-xts-plain64"
LUKS_KEY_BITS = 512
MIN_RETENTION_DAYS = 30
PUBLIC_PORTS = (80, 443)


@dataclass(frozen=True)
class Resource:
    """One resource as a policy sees it: Pulumi type, logical name and inputs (wire names:
    camelCase for docker, the provider's own keys for dynamic resources)."""

    type: str
    name: str
    props: Mapping[str, Any]
    urn: str = ""

    @property
    def kind(self) -> str:
        return kind_of(self.type, self.name)


@dataclass(frozen=True)
class Config:
    allowed_registries: tuple[str, ...] = DEFAULT_REGISTRIES
    min_retention_days: int = MIN_RETENTION_DAYS
    min_hsts_max_age: int = MIN_HSTS


@dataclass(frozen=True)
class Policy:
    name: str
    description: str
    applies: Callable[[Resource], bool]
    check: Callable[[Resource, Config], list[str]]


@dataclass(frozen=True)
class Violation:
    policy: str
    resource: str
    message: str

    def __str__(self) -> str:
        return f"{self.policy} ({self.resource}): {self.message}"


def _get(props: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    """A property by its camelCase or snake_case name (mocks and the engine use wire names)."""
    for n in names:
        if n in props:
            return props[n]
        snake = re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), n)
        if snake in props:
            return props[snake]
    return default


# --------------------------------------------------------------------------- containers


def no_published_ports(r: Resource, cfg: Config) -> list[str]:
    out = []
    ports = _get(r.props, "ports") or []
    if ports:
        shown = ", ".join(str(_get(p, "external", default="?")) + "->" + str(_get(p, "internal", default="?"))
                          for p in ports if isinstance(p, Mapping)) or str(len(ports))
        out.append(f"publishes ports ({shown}); only nginx may be public")
    if _get(r.props, "publishAllPorts"):
        out.append("publish_all_ports is set; only nginx may be public")
    if _get(r.props, "networkMode") == "host":
        out.append("uses the host network: its ports would be public")
    return out


def container_hardening(r: Resource, cfg: Config) -> list[str]:
    out = []
    caps = _get(r.props, "capabilities") or {}
    drops = [str(c).upper().removeprefix("CAP_") for c in (_get(caps, "drops") or [])]
    adds = [str(c).upper() for c in (_get(caps, "adds") or [])]
    if "ALL" not in drops:
        out.append("must drop ALL capabilities (NET_RAW included)")
    if adds:
        out.append(f"adds capabilities {', '.join(adds)}")
    sec = [str(s).replace("=", ":") for s in (_get(r.props, "securityOpts") or [])]
    if not any(s in ("no-new-privileges", "no-new-privileges:true") for s in sec):
        out.append("must set no-new-privileges")
    if _get(r.props, "privileged"):
        out.append("must not be privileged")
    mem = _get(r.props, "memory")
    if not isinstance(mem, (int, float)) or mem <= 0:
        out.append("needs a memory limit from the plan")
    if not _get(r.props, "cpus") and not _get(r.props, "cpuShares"):
        out.append("needs a CPU limit from the plan")
    log = _get(r.props, "logOpts") or {}
    if (_get(r.props, "logDriver") or "json-file") not in ("json-file", "local") or not log.get("max-size") \
            or not log.get("max-file"):
        out.append("needs rotated logs (json-file or local with max-size and max-file)")
    hc = _get(r.props, "healthcheck") or {}
    if not _get(hc, "tests"):
        out.append("needs a health check")
    if _get(r.props, "restart") != "unless-stopped":
        out.append("must restart unless-stopped")
    return out


def allowed_registries(r: Resource, cfg: Config) -> list[str]:
    from dn.errors import InvalidInput
    from dn.models import check_image_allowed

    image = _get(r.props, "image")
    if not isinstance(image, str) or not image:
        return ["has no image reference"]
    try:
        check_image_allowed(image, cfg.allowed_registries)
    except InvalidInput as e:
        return [e.rule]
    return []


# --------------------------------------------------------------------------- networks


def network_icc_disabled(r: Resource, cfg: Config) -> list[str]:
    out = []
    opts = _get(r.props, "options") or {}
    if str(opts.get(ICC_OPTION, "")).lower() != "false":
        out.append(f"{ICC_OPTION} must be \"false\" (containers must not reach each other)")
    bridge = str(opts.get(BRIDGE_OPTION, ""))
    if not re.fullmatch(r"dnt[0-9a-f]{12}", bridge):
        out.append(f"{BRIDGE_OPTION} must be dn's fixed tenant bridge name (dnt + 12 hex digits), not {bridge or 'unset'}")
    if (_get(r.props, "driver") or "bridge") != "bridge":
        out.append("must use the bridge driver")
    return out


# --------------------------------------------------------------------------- dynamic host resources


def _is_container(r: Resource) -> bool:
    return r.type == CONTAINER


POLICIES: tuple[Policy, ...] = (
    Policy("dn-no-published-ports", "no container publishes a port: only nginx (80/443) is public",
           _is_container, no_published_ports),
    Policy("dn-container-hardening", "containers drop every capability, cannot gain privileges, are limited, "
           "log with rotation and have a health check", _is_container, container_hardening),
    Policy("dn-allowed-registries", "container images come only from the allowed registries",
           _is_container, allowed_registries),
    Policy("dn-network-icc-disabled", "every tenant network is its own bridge with inter-container traffic disabled",
           lambda r: r.type == NETWORK, network_icc_disabled),
)


def policy(name: str) -> Policy:
    for p in POLICIES:
        if p.name == name:
            return p
    raise KeyError(name)


def validate(resource: Resource, cfg: Config = Config()) -> list[Violation]:
    """Every violation of every policy that applies to ``resource``."""
    out = []
    for p in POLICIES:
        if p.applies(resource):
            out += [Violation(p.name, resource.name, m) for m in p.check(resource, cfg)]
    return out


def validate_all(resources: Iterable[Resource], cfg: Config = Config()) -> list[Violation]:
    return [v for r in resources for v in validate(r, cfg)]


def applicable(resources: Sequence[Resource]) -> dict[str, list[str]]:
    """For each policy, the resources it applies to (tests use it to prove every policy ran)."""
    return {p.name: [r.name for r in resources if p.applies(r)] for p in POLICIES}
