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
dn-tenants-closed         the firewall baseline drops whatever a tenant bridge sends that no
                          tenant chain lets through (a bridge without its chain reaches nothing)
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
from dataclasses import dataclass
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


def plain(value: Any) -> Any:
    """Inputs as plain dicts, lists and scalars: the policy SDK hands them over as read-only
    Mapping/Sequence proxies (secrets unwrapped), which dn's models do not accept as lists."""
    if isinstance(value, Mapping):
        return {str(k): plain(x) for k, x in value.items()}
    if isinstance(value, (str, bytes)):
        return value
    if isinstance(value, Sequence):
        return [plain(x) for x in value]
    inner = getattr(value, "value", None)
    if type(value).__name__ == "Secret" and inner is not None:
        return plain(inner)
    return value


@dataclass(frozen=True)
class Config:
    """The pack's configuration: allowed registries and the backup retention dn is configured
    with (settings.retention.backup_daily_days), which the backup policy requires to be >= 30."""

    allowed_registries: tuple[str, ...] = DEFAULT_REGISTRIES
    retention_days: int = MIN_RETENTION_DAYS
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
#
# Both docker backends are checked on one normalized view (the shape of
# dn.host.docker.normalize_container): pulumi-docker's Container inputs are mapped onto it, dn's
# own DockerContainer inputs go through dn.host.docker's spec and expected state.


def is_container(r: Resource) -> bool:
    return r.type == CONTAINER or (r.kind == "container" and "role" in r.props)


def is_network(r: Resource) -> bool:
    return r.type == NETWORK or (r.kind == "network" and "bridge" in r.props)


def container_view(r: Resource) -> dict[str, Any]:
    """The container as it will run: published ports, capabilities, security options, limits,
    logging, health check, restart policy, image. Raises ValueError for inputs that do not
    describe a container."""
    if r.type == CONTAINER:
        p = r.props
        caps = _get(p, "capabilities") or {}
        hc = _get(p, "healthcheck") or {}
        mode = _get(p, "networkMode")
        ports = _get(p, "ports") or []
        return {
            "image": _get(p, "image"),
            "published": [f"{_get(x, 'external', default='?')}->{_get(x, 'internal', default='?')}"
                          for x in ports if isinstance(x, Mapping)] or ([str(len(ports))] if ports else []),
            "publish_all": bool(_get(p, "publishAllPorts")),
            "network_mode": mode,
            "networks": sorted(str(_get(n, "name")) for n in (_get(p, "networksAdvanced") or []) if isinstance(n, Mapping)),
            "restart": _get(p, "restart") or "no",
            "memory_mb": _get(p, "memory") or 0,
            "cpus": float(_get(p, "cpus") or 0),
            "cap_drop": sorted(str(c).upper().removeprefix("CAP_") for c in (_get(caps, "drops") or [])),
            "cap_add": sorted(str(c).upper() for c in (_get(caps, "adds") or [])),
            "security_opt": sorted(str(s).replace("=", ":") for s in (_get(p, "securityOpts") or [])),
            "privileged": bool(_get(p, "privileged")),
            "log": {"driver": _get(p, "logDriver") or "json-file", "opts": dict(_get(p, "logOpts") or {})},
            "health": {"test": list(_get(hc, "tests") or [])} if _get(hc, "tests") else None,
        }
    from dn.errors import InvalidInput
    from dn.host import docker as hd

    try:
        spec = hd.container_spec(r.props)
    except InvalidInput as e:
        raise ValueError(f"inputs do not describe a container: {e}") from None
    view = hd.expected_container(spec, {})
    observed = r.props.get("observed")
    if isinstance(observed, Mapping) and observed:
        # a refreshed resource: what the host actually runs is what counts
        view = {**view, **{k: observed[k] for k in view if k in observed}}
    return view


def _container_policy(check: Callable[[dict[str, Any], Config], list[str]]) -> Callable[[Resource, Config], list[str]]:
    def run(r: Resource, cfg: Config) -> list[str]:
        try:
            view = container_view(r)
        except ValueError as e:
            return [str(e)]
        return check(view, cfg)

    return run


def no_published_ports(view: Mapping[str, Any], cfg: Config) -> list[str]:
    out = []
    if view.get("published"):
        out.append(f"publishes ports ({', '.join(view['published'])}); only nginx may be public")
    if view.get("publish_all"):
        out.append("publishes all exposed ports; only nginx may be public")
    if view.get("network_mode") == "host":
        out.append("uses the host network: its ports would be public")
    return out


def container_hardening(view: Mapping[str, Any], cfg: Config) -> list[str]:
    out = []
    if "ALL" not in (view.get("cap_drop") or []):
        out.append("must drop ALL capabilities (NET_RAW included)")
    if view.get("cap_add"):
        out.append(f"adds capabilities {', '.join(view['cap_add'])}")
    if "no-new-privileges:true" not in (view.get("security_opt") or []) and \
            "no-new-privileges" not in (view.get("security_opt") or []):
        out.append("must set no-new-privileges")
    if view.get("privileged"):
        out.append("must not be privileged")
    mem = view.get("memory_mb")
    if not isinstance(mem, (int, float)) or mem <= 0:
        out.append("needs a memory limit from the plan")
    if not view.get("cpus"):
        out.append("needs a CPU limit from the plan")
    log = view.get("log") or {}
    opts = log.get("opts") or {}
    if log.get("driver") not in ("json-file", "local") or not opts.get("max-size") or not opts.get("max-file"):
        out.append("needs rotated logs (json-file or local with max-size and max-file)")
    if not (view.get("health") or {}).get("test"):
        out.append("needs a health check")
    if view.get("restart") != "unless-stopped":
        out.append("must restart unless-stopped")
    return out


def allowed_registries(view: Mapping[str, Any], cfg: Config) -> list[str]:
    from dn.errors import InvalidInput
    from dn.models import check_image_allowed

    image = view.get("image")
    if not isinstance(image, str) or not image:
        return ["has no image reference"]
    try:
        check_image_allowed(image, cfg.allowed_registries)
    except InvalidInput as e:
        return [e.rule]
    return []


# --------------------------------------------------------------------------- networks


def network_view(r: Resource) -> dict[str, Any]:
    if r.type == NETWORK:
        opts = _get(r.props, "options") or {}
        return {"driver": _get(r.props, "driver") or "bridge", "bridge": opts.get(BRIDGE_OPTION),
                "icc": str(opts.get(ICC_OPTION, "true")).lower() != "false"}
    from dn.errors import InvalidInput
    from dn.host import docker as hd

    try:
        view = hd.expected_network(hd.network_spec(r.props))
    except InvalidInput as e:
        raise ValueError(f"inputs do not describe a network: {e}") from None
    observed = r.props.get("observed")
    if isinstance(observed, Mapping) and observed:
        view = {**view, **{k: observed[k] for k in view if k in observed}}
    return view


def network_icc_disabled(r: Resource, cfg: Config) -> list[str]:
    try:
        view = network_view(r)
    except ValueError as e:
        return [str(e)]
    out = []
    if view.get("icc") is not False:
        out.append(f"{ICC_OPTION} must be \"false\" (containers must not reach each other)")
    bridge = str(view.get("bridge") or "")
    if not re.fullmatch(r"dnt[0-9a-f]{12}", bridge):
        out.append(f"{BRIDGE_OPTION} must be dn's fixed tenant bridge name (dnt + 12 hex digits), not {bridge or 'unset'}")
    if view.get("driver") != "bridge":
        out.append("must use the bridge driver")
    return out


# --------------------------------------------------------------------------- dynamic host resources
#
# dn's host resources carry the host baseline (``host``) and the tenant's host view (``tenant``)
# as inputs; the policies render what the providers will write from exactly those inputs, with
# dn's own renderers, and check the result.


def _host(r: Resource):
    from dn.models import parse_host

    data = r.props.get("host")
    if not isinstance(data, Mapping):
        raise ValueError("has no host baseline input")
    return parse_host(data)


def _tenant(r: Resource):
    from dn.models import parse_tenant

    data = r.props.get("tenant")
    if not isinstance(data, Mapping):
        raise ValueError("has no tenant input")
    return parse_tenant(data, host_view=True)


def _guard(check: Callable[[Resource, Config], list[str]]) -> Callable[[Resource, Config], list[str]]:
    """Inputs that do not even parse are a violation, not a crash of the pack."""
    def run(r: Resource, cfg: Config) -> list[str]:
        from dn.errors import DnError

        try:
            return check(r, cfg)
        except (ValueError, DnError) as e:
            return [f"cannot be checked: {e}"]

    return run


def is_firewall_baseline(r: Resource) -> bool:
    return r.kind == "firewall" and "tenant" not in r.props and "host" in r.props


def baseline_public_ports(r: Resource, cfg: Config) -> list[str]:
    """The rendered baseline of the resource's host, checked by :func:`public_exposure`."""
    from dn.host import firewall as fw

    host = _host(r)
    return public_exposure(fw.baseline_rulesets(host), host.ssh_port)


def public_exposure(rulesets, ssh_port: int = 22) -> list[str]:
    """Simulate new connections from an address on the internet against ``rulesets`` (one per
    family): exactly the public ports may be accepted, on TCP; INPUT's policy must be DROP."""
    from dn.host import firewall as fw
    from dn.render.iptables import SavedTable

    out = []
    for rs in rulesets:
        table = fw.simulate([rs], {"filter": SavedTable()})
        source, dest = ("203.0.113.7", "198.51.100.2") if rs.family == 4 else ("2001:db8::7", "2001:db8:1::2")
        mentioned = {int(x) for _c, rule in rs.rules for i, tok in enumerate(rule)
                     if i and rule[i - 1] in ("--dport", "--dports") for x in re.split(r"[,:]", tok) if x.isdigit()}
        ports = sorted(mentioned | {1, 21, 22, 25, 53, 2375, 2376, 3306, 5432, 6379, 8080, 8443, 9000, 65535,
                                    ssh_port})
        for proto in ("tcp", "udp"):
            open_ = [p for p in ports if fw.evaluate(table, fw.Packet(source, dest, p, "eth0", proto)) == "ACCEPT"]
            allowed = list(PUBLIC_PORTS) if proto == "tcp" else []
            if open_ != [p for p in allowed if p in ports]:
                out.append(f"IPv{rs.family} {proto} open to the internet: {open_ or 'none'}; "
                           f"only {', '.join(map(str, allowed)) or 'nothing'} may be")
        if (table.policies.get("INPUT") or "ACCEPT") != "DROP":
            out.append(f"IPv{rs.family} INPUT policy must be DROP")
    return out


# What Docker puts in FORWARD for a bridge network (dockerd 20.10): the DOCKER-USER jump first,
# then an accept for the bridge's outgoing traffic. dn's baseline must drop tenant bridges first.
_DOCKER_FORWARD = ("*filter\n:FORWARD DROP [0:0]\n:DOCKER-USER - [0:0]\n-A FORWARD -j DOCKER-USER\n"
                   "-A FORWARD -i dnt+ ! -o dnt+ -j ACCEPT\n-A DOCKER-USER -j RETURN\nCOMMIT\n")


def baseline_tenants_closed(r: Resource, cfg: Config) -> list[str]:
    """The rendered baseline of the resource's host on a Docker host, checked as ``dn verify``'s
    net.tenant-default-closed reads the live rules."""
    from dn.host import firewall as fw
    from dn.render.iptables import SavedTable, parse_save
    from dn.render.iptables import default_closed_findings

    rs = {x.family: x for x in fw.baseline_rulesets(_host(r))}
    v4 = fw.simulate([rs[4]], parse_save(_DOCKER_FORWARD))
    v6 = fw.simulate([rs[6]], {"filter": SavedTable()})
    return default_closed_findings(v4, v6)[0]


def is_nginx(r: Resource) -> bool:
    return r.kind == "nginx" and "host" in r.props


def _nginx_files(r: Resource) -> dict[str, str]:
    from dn.render import nginx as rn

    host = _host(r)
    if "tenant" in r.props:
        t = _tenant(r)
        return {rn.vhost_path(host, t): rn.render_vhost(t, host)}
    return rn.render_base(host)


def _walk(directives, path=()):
    for d in directives:
        yield d, path
        if d.block is not None:
            yield from _walk(d.block, path + (d,))


def tls_hsts(r: Resource, cfg: Config) -> list[str]:
    """The nginx files the resource will write, checked by :func:`nginx_tls`."""
    return nginx_tls(_nginx_files(r), base="tenant" not in r.props, min_hsts=cfg.min_hsts_max_age)


def nginx_tls(files: Mapping[str, str], *, base: bool, min_hsts: int = MIN_HSTS) -> list[str]:
    """Base config: ssl_protocols exactly TLSv1.2 TLSv1.3. Every server on 443: HSTS with a
    max-age of at least ``min_hsts``, sent ``always``, also from locations that set their own
    headers (nginx's add_header inheritance would drop it there)."""
    from dn.render.nginx import parse_config

    out = []
    for path, text in files.items():
        if not path.endswith(".conf"):
            continue  # the DH group (PEM) is not nginx syntax
        tree = parse_config(text)
        for d, _ in _walk(tree):
            if d.name == "ssl_protocols" and set(d.args) != {"TLSv1.2", "TLSv1.3"}:
                out.append(f"{path}: ssl_protocols {' '.join(d.args)}; only TLSv1.2 TLSv1.3 are allowed")
        if base and path.endswith("nginx.conf") and not any(d.name == "ssl_protocols" for d, _ in _walk(tree)):
            out.append(f"{path}: no ssl_protocols (TLSv1.2 TLSv1.3 required)")
        for d, parents in _walk(tree):
            if d.name != "server" or not any(x.name == "listen" and "443" in x.args[0] for x in d.block or ()):
                continue
            if any(x.name == "ssl_reject_handshake" and x.args == ("on",) for x in d.block or ()):
                continue  # never completes a handshake, so never sends a response
            scopes = [d] + [x for x, _ in _walk(d.block or ()) if x.name == "location"]
            for scope in scopes:
                headers = [x for x in scope.block or () if x.name == "add_header"]
                if scope is not d and not headers:
                    continue  # a location without add_header inherits the server's
                hsts = [x for x in headers if x.args and x.args[0].lower() == "strict-transport-security"]
                label = "server" if scope is d else f"location {' '.join(scope.args)}"
                if not hsts:
                    out.append(f"{path}: {label} on 443 sends no Strict-Transport-Security")
                    continue
                m = re.search(r"max-age=(\d+)", hsts[0].args[1] if len(hsts[0].args) > 1 else "")
                if not m or int(m.group(1)) < min_hsts:
                    out.append(f"{path}: {label}: HSTS max-age must be at least {min_hsts} s")
                if "always" not in hsts[0].args:
                    out.append(f"{path}: {label}: HSTS must be sent 'always' (also on errors)")
    return out


def is_vhost(r: Resource) -> bool:
    return is_nginx(r) and "tenant" in r.props


def rate_limits(r: Resource, cfg: Config) -> list[str]:
    """The vhost file the resource will write, checked by :func:`nginx_rate_limits`."""
    return nginx_rate_limits(_nginx_files(r))


def nginx_rate_limits(files: Mapping[str, str]) -> list[str]:
    """Every vhost declares a per-IP and a per-tenant request zone (the tenant's keyed on a
    constant, never on a client-chosen value) and a per-IP connection zone, and its 443 server
    applies all three."""
    from dn.render.nginx import parse_config

    out = []
    for path, text in files.items():
        tree = parse_config(text)
        zones = {}
        for d, _ in _walk(tree):
            if d.name in ("limit_req_zone", "limit_conn_zone") and len(d.args) >= 2:
                name = next((a.split("=", 1)[1].split(":")[0] for a in d.args if a.startswith("zone=")), None)
                zones[name] = (d.name, d.args[0])
        per_ip = {z for z, (kind, key) in zones.items() if kind == "limit_req_zone" and key == "$binary_remote_addr"}
        per_tenant = {z for z, (kind, key) in zones.items() if kind == "limit_req_zone" and not key.startswith("$")}
        conn = {z for z, (kind, key) in zones.items() if kind == "limit_conn_zone"}
        if not per_ip:
            out.append(f"{path}: no per-IP request zone (limit_req_zone $binary_remote_addr)")
        if not per_tenant:
            out.append(f"{path}: no per-tenant request zone keyed on a constant")
        if any(kind == "limit_req_zone" and key in ("$host", "$http_host", "$server_name")
               for kind, key in zones.values()):
            out.append(f"{path}: a request zone is keyed on a client-chosen host name")
        for d, _ in _walk(tree):
            if d.name != "server" or not any(x.name == "listen" and "443" in x.args[0] for x in d.block or ()):
                continue
            used = {a.split("=", 1)[1] for x in d.block or () if x.name == "limit_req" for a in x.args
                    if a.startswith("zone=")}
            used_conn = {x.args[0] for x in d.block or () if x.name == "limit_conn" and x.args}
            if not used & per_ip:
                out.append(f"{path}: the 443 server does not apply a per-IP rate limit")
            if not used & per_tenant:
                out.append(f"{path}: the 443 server does not apply the per-tenant rate limit")
            if not used_conn & conn:
                out.append(f"{path}: the 443 server does not limit connections per IP")
    return out


def is_volume(r: Resource) -> bool:
    return r.kind == "volume" and "tenant" in r.props and "host" in r.props


def luks(r: Resource, cfg: Config) -> list[str]:
    from dn.host import luks as hl

    spec = hl.volume_spec(_host(r), _tenant(r))
    out = []
    if spec.cipher != LUKS_CIPHER:
        out.append(f"cipher {spec.cipher}; must be {LUKS_CIPHER}")
    if spec.key_bits != LUKS_KEY_BITS:
        out.append(f"key size {spec.key_bits} bits; must be {LUKS_KEY_BITS}")
    if hl.LUKS_TYPE != "luks2":
        out.append(f"format {hl.LUKS_TYPE}; must be luks2")
    header = r.props.get("header")
    if isinstance(header, Mapping) and header:  # refreshed: what the volume really has
        if header.get("cipher") and header.get("cipher") != LUKS_CIPHER:
            out.append(f"the volume's header says cipher {header.get('cipher')}")
        if header.get("key_bits") and header.get("key_bits") != LUKS_KEY_BITS:
            out.append(f"the volume's header says a {header.get('key_bits')}-bit key")
    if "key" not in r.props:
        out.append("has no key input")
    return out


def is_backup_timer(r: Resource) -> bool:
    return r.kind == "timer" and str(r.props.get("unit", "")).startswith("dn-backup-")


def backup_schedule(r: Resource, cfg: Config) -> list[str]:
    """The backup runs every day (RPO 24 h) and backups are kept at least 30 days."""
    from dn.backup import schedule as sched

    unit = str(r.props.get("unit"))
    if r.props.get("tenant"):
        expr = _tenant(r).backup_schedule
    else:
        expr = str((r.props.get("schedules") or {}).get("backup") or "*-*-* 02:30:00")
    out = []
    cal = sched.parse(expr)
    if len(cal.weekdays) != 7 or len(cal.months) != 12 or len(cal.days) != 31 or cal.years is not None:
        out.append(f"{unit}: schedule {expr!r} does not run every day (RPO 24 h)")
    if cfg.retention_days < cfg.min_retention_days:
        out.append(f"{unit}: backups are kept {cfg.retention_days} days; at least {cfg.min_retention_days} required")
    return out


POLICIES: tuple[Policy, ...] = (
    Policy("dn-no-published-ports", "no container publishes a port: only nginx (80/443) is public",
           is_container, _container_policy(no_published_ports)),
    Policy("dn-container-hardening", "containers drop every capability, cannot gain privileges, are limited, "
           "log with rotation and have a health check", is_container, _container_policy(container_hardening)),
    Policy("dn-allowed-registries", "container images come only from the allowed registries",
           is_container, _container_policy(allowed_registries)),
    Policy("dn-network-icc-disabled", "every tenant network is its own bridge with inter-container traffic disabled",
           is_network, network_icc_disabled),
    Policy("dn-baseline-public-ports", "the firewall baseline accepts new connections from the internet on 80 and 443 "
           "only (TCP, IPv4 and IPv6), INPUT policy DROP", is_firewall_baseline, _guard(baseline_public_ports)),
    Policy("dn-tenants-closed", "the firewall baseline drops what a tenant bridge sends unless that tenant's chain "
           "lets it through, before Docker's accepts (IPv4 and IPv6)", is_firewall_baseline,
           _guard(baseline_tenants_closed)),
    Policy("dn-tls-hsts", "nginx serves TLS 1.2/1.3 only and every HTTPS response carries HSTS (max-age >= 2 years)",
           is_nginx, _guard(tls_hsts)),
    Policy("dn-rate-limits", "every vhost limits requests per client IP and per tenant, and connections per IP",
           is_vhost, _guard(rate_limits)),
    Policy("dn-luks", "tenant volumes are LUKS2 with aes-xts-plain64 and a 512-bit key", is_volume, _guard(luks)),
    Policy("dn-backup-schedule", "backups run daily and are kept at least 30 days", is_backup_timer,
           _guard(backup_schedule)),
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
