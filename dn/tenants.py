"""Tenants and their stacks: the registry, the plan, and the runs that put a plan on the host.

Every changing operation goes **validate → plan → stack → audit**:

1. *validate*: the request becomes a :class:`~dn.models.TenantSpec` (slug, domains, plan, image,
   CONTAINER_CONFIG, schedule) and is checked against the other tenants of its host (domains,
   bridge names, subnets). Nothing has been written, no stack exists yet: bad input exits 2 with
   the field and the rule, leaving no row, no stack directory and no file on the host.
2. *plan*: the resources the tenant will have on the host (:func:`describe`); ``--dry-run``
   prints it and stops there.
3. *stack*: inside :func:`dn.audit.privileged` (the tenant's and the host's lock, one audit
   entry): the registry row is written (the registry is the desired state), the stack is opened,
   its secrets are set, and ``pulumi up`` runs with dn's policy pack as a gate.

A failed ``up`` leaves each host resource as it was (the providers validate, swap atomically and
roll back) and the registry holding the desired state: rerunning the same command, or
``dn up --tenant SLUG``, converges.

The registry is the platform database: one row in ``tenants`` and the non-secret spec in
``tenant_settings`` under ``dn.*`` keys. The secrets live only in the tenant's stack config, as
Pulumi secrets encrypted with the state passphrase: ``dn:containerConfig`` (given by the operator,
over a file or stdin, never argv) and ``dn:luksKey`` (64 random bytes made by dn with
``secrets.token_bytes`` on the first create, never shown to anyone). They are written with
``pulumi config set --secret`` reading the value from stdin: the Automation API's ``set_config``
would put it in the CLI's argv.

Stacks: one per tenant, named after the slug; one per host, ``host--<name>`` (slugs never
contain ``--``, so the two never collide).
"""
from __future__ import annotations

import base64
import os
import subprocess
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from pydantic import SecretStr

from dn.errors import DnError, InvalidInput, OperationFailed
from dn.models import (
    HostBaseline,
    TenantSpec,
    TenantStatus,
    allocate_subnet,
    check_tenant_set,
    host_view_data,
    parse_tenant,
    tenant_from_settings,
)

if TYPE_CHECKING:
    from dn.config import Settings
    from dn.context import Context
    from dn.db import Connection

SETTING_PREFIX = "dn."
SPEC_KEYS = ("domains", "image", "subnet", "backup_schedule", "preview", "allow_wildcard")
CONFIG_CONTAINER = "dn:containerConfig"
CONFIG_LUKS = "dn:luksKey"
HOST_STACK_PREFIX = "host--"
SUBNET_PREFIX = 28  # 16 addresses: gateway, tagging, preview and room for more servers
# Registry statuses -> what the host serves (dn.models.TenantStatus).
SERVES = {"active": TenantStatus.active, "suspended": TenantStatus.suspended,
          "cancelled": TenantStatus.suspended, "deleting": TenantStatus.deleting}

# Registry statuses whose tenants have a stack on their host (cancelled: destroyed, its data
# waiting for the GDPR deletion job; deleting/deleted: in or after deletion).
DEPLOYED = ("active", "suspended")
OnEvent = Callable[[Any], None]


def host_stack_name(host: str) -> str:
    return HOST_STACK_PREFIX + host


# ---------------------------------------------------------------------------------------------
# the registry


@dataclass
class TenantRecord:
    """A tenant as the registry holds it (no secret)."""

    id: int
    slug: str
    display_name: str
    plan: str
    host: str
    status: str
    created_at: datetime | None
    domains: list[str]
    image: str
    subnet: str
    backup_schedule: str
    preview: bool
    allow_wildcard: bool = False

    def spec_data(self) -> dict[str, Any]:
        """The raw spec (without CONTAINER_CONFIG) as parse_tenant reads it."""
        return {
            "slug": self.slug, "domains": list(self.domains), "plan": self.plan, "image": self.image,
            "preview": self.preview, "backup_schedule": self.backup_schedule, "subnet": self.subnet,
            "allow_wildcard": self.allow_wildcard, "status": SERVES.get(self.status, TenantStatus.suspended).value,
        }

    def host_view(self, settings: "Settings") -> TenantSpec:
        """The validated spec as the host resources see it (no CONTAINER_CONFIG)."""
        return parse_tenant(self.spec_data(), plans=settings.plans, host_view=True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "slug": self.slug, "display_name": self.display_name, "plan": self.plan, "host": self.host,
            "status": self.status, "created_at": self.created_at.isoformat() if self.created_at else None,
            "domains": list(self.domains), "image": self.image, "subnet": self.subnet,
            "backup_schedule": self.backup_schedule, "preview": self.preview, "allow_wildcard": self.allow_wildcard,
            "stack": self.slug,
        }


def connect(settings: "Settings", what: str) -> "Connection":
    """A connection to the platform database (the registry)."""
    from dn import db

    return db.connect(settings.database, application_name=f"dn {what}")


def _records(conn: "Connection", where: str = "", params: Sequence[Any] = ()) -> list[TenantRecord]:
    from dn import db

    with db.translate_errors("reading the tenant registry"):
        rows = db.rows(conn, f"""
            SELECT t.id, t.slug, t.display_name, t.plan, t.host, t.status, t.created_at,
                   coalesce(jsonb_object_agg(substr(s.key, {len(SETTING_PREFIX) + 1}), s.value)
                            FILTER (WHERE s.key IS NOT NULL), '{{}}'::jsonb) AS spec
              FROM tenants t
              LEFT JOIN tenant_settings s ON s.tenant_id = t.id AND s.key LIKE 'dn.%%'
             {where}
             GROUP BY t.id ORDER BY t.slug""", list(params))
    out = []
    for r in rows:
        spec = r["spec"] or {}
        out.append(TenantRecord(
            id=r["id"], slug=r["slug"], display_name=r["display_name"], plan=r["plan"], host=r["host"],
            status=r["status"], created_at=r["created_at"], domains=list(spec.get("domains") or []),
            image=str(spec.get("image") or ""), subnet=str(spec.get("subnet") or ""),
            backup_schedule=str(spec.get("backup_schedule") or ""), preview=bool(spec.get("preview", True)),
            allow_wildcard=bool(spec.get("allow_wildcard", False)),
        ))
    return out


def list_tenants(conn: "Connection", *, host: str | None = None, include_deleted: bool = False) -> list[TenantRecord]:
    """Every registered tenant (of ``host``), deleted ones only with ``include_deleted``."""
    clauses, params = [], []
    if host:
        clauses.append("t.host = %s")
        params.append(host)
    if not include_deleted:
        clauses.append("t.status <> 'deleted'")
    return _records(conn, ("WHERE " + " AND ".join(clauses)) if clauses else "", params)


def get_tenant(conn: "Connection", slug: str) -> TenantRecord | None:
    found = _records(conn, "WHERE t.slug = %s", [slug])
    return found[0] if found else None


def require_tenant(conn: "Connection", slug: str) -> TenantRecord:
    rec = get_tenant(conn, slug)
    if rec is None or rec.status == "deleted":
        raise InvalidInput("tenant", f"no tenant named {slug!r} in the registry (see `dn tenant list`)")
    return rec


def _write_spec(conn: "Connection", tenant_id: int, spec: TenantSpec) -> None:
    from dn import db

    data = host_view_data(spec)
    for key in SPEC_KEYS:
        conn.execute(
            "INSERT INTO tenant_settings (tenant_id, key, value) VALUES (%s, %s, %s) "
            "ON CONFLICT (tenant_id, key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
            (tenant_id, SETTING_PREFIX + key, db.jsonb(data[key])))


# ---------------------------------------------------------------------------------------------
# validation and plans (no side effects)


@dataclass
class TenantRequest:
    """What an operator asks for: ``dn tenant create`` / ``update`` options. ``None`` = unchanged
    (update) or the default (create)."""

    slug: str
    domains: list[str] | None = None
    plan: str | None = None
    image: str | None = None
    container_config: SecretStr | None = None
    preview: bool | None = None
    backup_schedule: str | None = None
    status: str | None = None
    display_name: str | None = None
    host: str | None = None
    allow_wildcard: bool | None = None
    # (field, rule) of input that could not even be read (a secret file that is not there),
    # reported together with every other invalid field
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    def audit_args(self) -> dict[str, Any]:
        """The request as the audit entry records it (the secret only as "given or not")."""
        out = {k: v for k, v in self.__dict__.items()
               if v is not None and k not in ("container_config", "unreadable")}
        out["sgtm_config_given"] = self.container_config is not None
        return out


@dataclass
class Plan:
    """A validated change to one tenant: the spec after the change and what it puts on the host."""

    action: str  # create / update / resume
    spec: TenantSpec
    host: HostBaseline
    display_name: str
    others: list[TenantRecord]
    before: TenantRecord | None = None
    resources: list[dict[str, Any]] = field(default_factory=list)
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    docker_backend: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action, "tenant": self.spec.slug, "host": self.host.name,
            "docker_backend": self.docker_backend,
            "display_name": self.display_name,
            "spec": host_view_data(self.spec),
            "changes": {k: {"from": a, "to": b} for k, (a, b) in self.changes.items()},
            "resources": self.resources,
        }


def describe(spec: TenantSpec, host: HostBaseline, retention_days: int) -> list[dict[str, Any]]:
    """The resources a tenant has on its host, with the properties that carry a promise."""
    from dn.render.nginx import vhost_path

    lim = spec.limits
    out: list[dict[str, Any]] = [
        {"kind": "network", "name": spec.network, "bridge": spec.bridge, "subnet": spec.subnet,
         "icc": False, "labels": {"dn.tenant": spec.slug}},
        {"kind": "container", "name": spec.tagging_container, "image": spec.image, "address": spec.tagging_address,
         "published_ports": [], "memory_mb": lim.memory_mb, "cpus": lim.cpus, "capabilities": "drop ALL",
         "no_new_privileges": True, "restart": "unless-stopped"},
    ]
    if spec.preview:
        out.append({"kind": "container", "name": spec.preview_container, "image": spec.image,
                    "address": spec.preview_address, "published_ports": [], "memory_mb": lim.memory_mb,
                    "cpus": lim.cpus, "capabilities": "drop ALL", "no_new_privileges": True,
                    "restart": "unless-stopped"})
    out += [
        {"kind": "firewall", "chains": [spec.chain_forward, spec.chain_input], "bridge": spec.bridge},
        {"kind": "nginx", "file": vhost_path(host, spec), "domains": list(spec.domains),
         "rate_per_ip": lim.rate_per_ip, "burst_per_ip": lim.burst_per_ip, "rate_per_tenant": lim.rate_per_tenant,
         "burst_per_tenant": lim.burst_per_tenant, "conn_per_ip": lim.conn_per_ip, "serves": spec.status.value},
        {"kind": "volume", "image": host.path(spec.volume_image), "cipher": "aes-xts-plain64", "key_bits": 512,
         "size_mb": lim.volume_mb, "mount": host.path(spec.mount_path)},
        {"kind": "timer", "unit": f"{spec.backup_unit}.timer", "schedule": spec.backup_schedule,
         "retention_days": retention_days},
    ]
    return out


def _host_of(settings: "Settings", name: str | None) -> HostBaseline:
    return HostBaseline.from_settings(settings, name or settings.default_host)


def _check_set(settings: "Settings", spec: TenantSpec, others: Iterable[TenantRecord], host: HostBaseline) -> None:
    views = [o.host_view(settings) for o in others if o.slug != spec.slug]
    check_tenant_set([*views, spec], host)


def _read_container_config(req: TenantRequest) -> str | None:
    return req.container_config.get_secret_value() if req.container_config is not None else None


def _display_name_rule(name: str) -> str | None:
    if not 1 <= len(name) <= 200 or any(ord(c) < 32 for c in name):
        return "must be 1-200 printable characters"
    return None


def check_create_request(settings: "Settings", req: TenantRequest) -> None:
    """Every check of a create request that needs no I/O (no database, no host), run before any
    is attempted; raises one InvalidInput naming every invalid field (slug, domains, plan, image,
    CONTAINER_CONFIG, schedule, host, status, display name)."""
    pairs: list[tuple[str, str]] = list(req.unreadable)
    host_name = req.host or settings.default_host
    subnet = "10.0.0.0/28"  # a placeholder inside the host's pool, when the host is known
    try:
        settings.host(host_name)
        subnet = _first_subnet(_host_of(settings, host_name))
    except InvalidInput as e:
        pairs.append((e.field, e.rule))
    if req.container_config is None and not any(f == "container_config" for f, _ in pairs):
        pairs.append(("container_config", "is required: give --container-config-file FILE or "
                                          "--container-config-stdin (never on the command line)"))
    if req.status not in (None, "active"):
        pairs.append(("status", "a new tenant starts active"))
    data = {
        "slug": req.slug, "domains": list(req.domains or []), "plan": req.plan or "standard",
        "image": req.image or settings.images.sgtm, "container_config": _read_container_config(req),
        "preview": True if req.preview is None else req.preview,
        "backup_schedule": req.backup_schedule or settings.schedules.backup,
        "allow_wildcard": bool(req.allow_wildcard), "status": "active", "subnet": subnet,
    }
    try:
        # a missing CONTAINER_CONFIG is reported above: the rest is checked without it
        parse_tenant(data, plans=settings.plans, allowed_registries=settings.images.allowed_registries,
                     host_view=req.container_config is None)
    except InvalidInput as e:
        pairs += getattr(e, "errors", [(e.field, e.rule)])
    if req.display_name and (rule := _display_name_rule(req.display_name)):  # empty: the slug is the name
        pairs.append(("display_name", rule))
    if pairs:
        raise _invalid_request(pairs)


def check_update_request(settings: "Settings", req: TenantRequest) -> None:
    """The checks of an update request that need no I/O: each given field on its own (what
    depends on the registered tenant, such as wildcard domains or the domains of other tenants,
    is checked against the registry afterwards); raises one InvalidInput naming every invalid field."""
    from dn.models import check_slug

    pairs: list[tuple[str, str]] = list(req.unreadable)
    try:
        check_slug(req.slug)
    except ValueError as e:
        pairs.append(("slug", str(e)))
    if req.status not in (None, "active", "suspended"):
        pairs.append(("status", "must be active or suspended (deletion is `dn gdpr delete` / `dn tenant destroy`)"))
    if req.host is not None:
        try:
            settings.host(req.host)
        except InvalidInput as e:
            pairs.append((e.field, e.rule))
    data = {
        "slug": "placeholder", "domains": list(req.domains) if req.domains is not None else ["placeholder.invalid"],
        "plan": req.plan if req.plan is not None else next(iter(settings.plans), "standard"),
        "image": req.image if req.image is not None else settings.images.sgtm,
        "container_config": _read_container_config(req),
        "backup_schedule": req.backup_schedule if req.backup_schedule is not None else settings.schedules.backup,
        "allow_wildcard": True if req.allow_wildcard is None else req.allow_wildcard,
        "status": "active", "subnet": "10.0.0.0/28",
    }
    try:
        parse_tenant(data, plans=settings.plans, allowed_registries=settings.images.allowed_registries,
                     host_view=req.container_config is None)
    except InvalidInput as e:
        pairs += getattr(e, "errors", [(e.field, e.rule)])
    if req.display_name is not None and (rule := _display_name_rule(req.display_name)):
        pairs.append(("display_name", rule))
    if pairs:
        raise _invalid_request(pairs)


def _invalid_request(pairs: list[tuple[str, str]]) -> InvalidInput:
    """One InvalidInput naming every invalid field, in the order of the request's fields."""
    from dn.models import field_rank, invalid_all

    order = [f.name for f in fields(TenantRequest)]
    return invalid_all(sorted(pairs, key=lambda p: field_rank(p[0], order)))


def plan_create(settings: "Settings", conn: "Connection", req: TenantRequest,
                host_subnets: Callable[[], Sequence[str]] = lambda: ()) -> Plan:
    """Validate a create request against the settings and the registry; raises InvalidInput.

    A new tenant's subnet is the first free one of the host's tenant pool: not used by another
    registered tenant nor by any Docker network already on the host (``host_subnets``, asked
    only after the request itself is valid)."""
    host_name = req.host or settings.default_host
    settings.host(host_name)  # InvalidInput naming the configured hosts
    host = _host_of(settings, host_name)
    if req.container_config is None:
        raise InvalidInput("container_config", "is required: give --container-config-file FILE or "
                                               "--container-config-stdin (never on the command line)")
    data: dict[str, Any] = {
        "slug": req.slug,
        "domains": list(req.domains or []),
        "plan": req.plan or "standard",
        "image": req.image or settings.images.sgtm,
        "container_config": _read_container_config(req),
        "preview": True if req.preview is None else req.preview,
        "backup_schedule": req.backup_schedule or settings.schedules.backup,
        "allow_wildcard": bool(req.allow_wildcard),
        "status": "active",
        # a placeholder inside the pool so the spec validates; the real one is allocated below
        "subnet": _first_subnet(host),
    }
    if req.status not in (None, "active"):
        raise InvalidInput("status", "a new tenant starts active")
    spec = tenant_from_settings(data, settings)
    existing = get_tenant(conn, spec.slug)
    others = [o for o in list_tenants(conn, host=host.name) if o.slug != spec.slug]
    if existing is not None and existing.status != "deleted":
        if existing.host != host.name:
            raise InvalidInput("slug", f"tenant {spec.slug!r} already exists on host {existing.host}")
        # the same create again (after a failed up): resume with the registered subnet
        spec = tenant_from_settings({**data, "subnet": existing.subnet}, settings)
        if existing.status != "active" or host_view_data(spec) != host_view_data(existing.host_view(settings)):
            raise InvalidInput("slug", f"tenant {spec.slug!r} already exists with a different spec; "
                                       "change it with `dn tenant update`")
        _check_set(settings, spec, others, host)
        return Plan("resume", spec, host, existing.display_name, others, before=existing,
                    resources=describe(spec, host, settings.retention.backup_daily_days))
    if existing is not None:  # a deleted tenant's row stays for its accounting records
        raise InvalidInput("slug", f"{spec.slug!r} belonged to a deleted tenant; choose another slug")
    taken = [o.subnet for o in others if o.subnet]
    taken += [n for n in host_subnets() if _is_v4(n)]
    subnet = allocate_subnet(host.tenant_pool, taken, SUBNET_PREFIX)
    spec = tenant_from_settings({**data, "subnet": subnet}, settings)
    _check_set(settings, spec, others, host)
    name = req.display_name or spec.slug
    _check_display_name(name)
    return Plan("create", spec, host, name, others, resources=describe(spec, host, settings.retention.backup_daily_days))


def _is_v4(cidr: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_network(cidr, strict=False).version == 4
    except ValueError:
        return False


def docker_subnets(settings: "Settings", host: str) -> list[str]:
    """The subnets of every Docker network on the host (Docker refuses overlapping pools)."""
    import json as _json

    from dn import ssh

    with ssh.connect(settings.host(host)) as s:
        ids = s.run(["docker", "network", "ls", "--quiet", "--no-trunc"]).text.split()
        if not ids:
            return []
        nets = _json.loads(s.run(["docker", "network", "inspect", *ids]).text or "[]")
    return sorted({c.get("Subnet") for n in nets for c in ((n.get("IPAM") or {}).get("Config") or [])
                   if c.get("Subnet")})


def _first_subnet(host: HostBaseline) -> str:
    import ipaddress

    return str(next(ipaddress.IPv4Network(host.tenant_pool).subnets(new_prefix=SUBNET_PREFIX)))


def _check_display_name(name: str) -> None:
    if rule := _display_name_rule(name):
        raise InvalidInput("display_name", rule)


def plan_update(settings: "Settings", conn: "Connection", req: TenantRequest) -> Plan:
    """Validate an update: the registered spec with the requested fields replaced."""
    rec = require_tenant(conn, req.slug)
    if req.host not in (None, rec.host):
        raise InvalidInput("host", "a tenant cannot move between hosts with update")
    if req.status not in (None, "active", "suspended"):
        raise InvalidInput("status", "must be active or suspended (deletion is `dn gdpr delete` / `dn tenant destroy`)")
    if rec.status not in ("active", "suspended"):
        raise InvalidInput("tenant", f"tenant {rec.slug!r} is {rec.status}: it cannot be updated")
    host = _host_of(settings, rec.host)
    before = rec.host_view(settings)
    data = rec.spec_data()
    for key in ("domains", "plan", "image", "preview", "backup_schedule", "allow_wildcard"):
        v = getattr(req, key)
        if v is not None:
            data[key] = list(v) if key == "domains" else v
    if req.status is not None:
        data["status"] = req.status
    spec = parse_tenant(data, plans=settings.plans, allowed_registries=settings.images.allowed_registries,
                        host_view=True)
    if req.container_config is not None:
        # validates the new value (the message never shows it)
        tenant_from_settings({**data, "container_config": _read_container_config(req)}, settings)
    others = list_tenants(conn, host=rec.host)
    _check_set(settings, spec, others, host)
    name = req.display_name if req.display_name is not None else rec.display_name
    _check_display_name(name)
    old, new = host_view_data(before), host_view_data(spec)
    changes = {k: (old[k], new[k]) for k in new if old.get(k) != new[k]}
    if name != rec.display_name:
        changes["display_name"] = (rec.display_name, name)
    if req.container_config is not None:
        changes["container_config"] = ("[secret]", "[secret, new]")
    return Plan("update", spec, host, name, [o for o in others if o.slug != rec.slug], before=rec,
                resources=describe(spec, host, settings.retention.backup_daily_days), changes=changes)


def check_certificate(settings: "Settings", host: HostBaseline, spec: TenantSpec) -> None:
    """The tenant's certificate and key must be on its host (``<cert_dir>/<first domain>.crt``
    and ``.key``) before its vhost can be served; checked over SSH before anything is written."""
    from dn import ssh
    from dn.render.nginx import cert_paths

    crt, key = cert_paths(host, spec)
    with ssh.connect(settings.host(host.name)) as s:
        missing = [p for p in (crt, key) if not s.exists(p)]
    if missing:
        raise InvalidInput("domains", f"no certificate for {spec.domains[0]} on host {host.name}: "
                                      f"{' and '.join(missing)} missing",
                           hint="install the certificate and its key there (mode 0600 for the key), then rerun")


def docker_backend(settings: "Settings", environ: Mapping[str, str] | None) -> str:
    """The docker backend the tenant's stack will use (a ConfigError when the one asked for is
    not available), decided before anything is written."""
    from dn.host.docker import docker_backend as choose

    return choose(settings, environ)


# ---------------------------------------------------------------------------------------------
# stacks


def _policy_args(settings: "Settings") -> dict[str, Any]:
    from stacks.programs import policy_pack_args

    return policy_pack_args(settings)


def _provider_env(settings: "Settings", host: str) -> dict[str, str]:
    """What the stack's provider processes need: dn's modules, and the host's SSH target as the
    current configuration has it (they never connect with the pin recorded in the state)."""
    from stacks import programs
    from stacks.providers.common import host_env

    return {**programs.provider_env(), **host_env(host, programs.ssh_target_data(settings.host(host)))}


def tenant_stack(settings: "Settings", spec: TenantSpec, others: Sequence[TenantRecord],
                 environ: Mapping[str, str] | None = None, *, host: str):
    """The tenant's stack with its inline program (created on first use)."""
    from dn import engine
    from stacks import programs

    program = programs.tenant_program(programs.tenant_inputs(
        settings, spec, [o.host_view(settings) for o in others], host, environ=environ))
    return engine.stack(settings, spec.slug, program, environ=environ, extra_env=_provider_env(settings, host))


def host_stack(settings: "Settings", host: HostBaseline, environ: Mapping[str, str] | None = None):
    from dn import engine
    from stacks import programs

    program = programs.host_program(programs.host_inputs(settings, host))
    return engine.stack(settings, host_stack_name(host.name), program, environ=environ,
                        extra_env=_provider_env(settings, host.name))


def verify_host(settings: "Settings", name: str, verified: set[str] | None = None) -> None:
    """Make sure host ``name`` is the host its pinned key says (one SSH handshake and login)
    before anything acts on or reports about it: an unknown, changed or revoked key is a
    HostKeyError (exit 3) naming the fingerprint the host presented and the fix. ``verified``
    holds the hosts this run has already checked (each is checked once per run)."""
    from dn import ssh

    if verified is not None and name in verified:
        return
    with ssh.connect(settings.host(name)):
        pass
    if verified is not None:
        verified.add(name)


def _stack_config_keys(settings: "Settings", stack_name: str) -> set[str]:
    """The config keys a stack has, read from its Pulumi.<stack>.yaml (values stay encrypted)."""
    import yaml

    from dn import engine

    p = engine.stack_work_dir(settings, stack_name) / f"Pulumi.{stack_name}.yaml"
    try:
        doc = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        return set()
    return set((doc.get("config") or {}).keys())


def set_secret_config(st: Any, key: str, value: str) -> None:
    """Store ``value`` as the secret config ``key`` of stack ``st``, passing it on stdin."""
    from dn import tooling

    env = dict(st.workspace.env_vars or {})
    exe = tooling.install_root(tooling.PULUMI_VERSION, os.environ) / "bin" / "pulumi"
    try:
        p = subprocess.run(
            [str(exe), "config", "set", "--secret", key, "--stack", st.name, "--non-interactive"],
            input=value.encode(), cwd=st.workspace.work_dir, env={**os.environ, **env},
            capture_output=True, timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise OperationFailed(f"setting the stack secret {key} failed: {type(e).__name__}", where=f"stack {st.name}",
                              hint="run `dn setup`") from None
    if p.returncode != 0:
        from dn.engine import scrub

        msg = scrub(p.stderr.decode(errors="replace").strip()[-300:], [value])
        raise OperationFailed(f"setting the stack secret {key} failed: {msg}", where=f"stack {st.name}")


def ensure_secrets(settings: "Settings", st: Any, container_config: str | None) -> list[str]:
    """Give the stack its secrets: a new LUKS key on first use (never replaced: it unlocks the
    tenant's volume), and CONTAINER_CONFIG when one is given. Returns the keys written."""
    keys = _stack_config_keys(settings, st.name)
    written = []
    if CONFIG_LUKS not in keys:
        from dn.host.luks import new_key  # 64 bytes from secrets.token_bytes

        set_secret_config(st, CONFIG_LUKS, base64.b64encode(new_key()).decode())
        written.append(CONFIG_LUKS)
    if container_config is not None:
        set_secret_config(st, CONFIG_CONTAINER, container_config)
        written.append(CONFIG_CONTAINER)
    elif CONFIG_CONTAINER not in keys:
        raise InvalidInput("container_config", f"stack {st.name} has no CONTAINER_CONFIG: give "
                                               "--container-config-file or --container-config-stdin")
    return written


@dataclass
class RunResult:
    """What one stack run did (``up``, ``preview``, ``refresh``, ``destroy``)."""

    stack: str
    op: str
    changes: dict[str, int] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    error: DnError | None = None
    purge: dict[str, Any] | None = None  # destroy: what of the stack's state was removed and checked

    def to_dict(self) -> dict[str, Any]:
        return {"stack": self.stack, "op": self.op, "changes": self.changes, "outputs": self.outputs,
                "error": str(self.error) if self.error else None, "purge": self.purge}


def _collector(events: list[dict], on_event: OnEvent | None) -> Callable[[Any], None]:
    from dn import engine

    def collect(ev: Any) -> None:
        d = engine.event_dict(ev)
        diag = d.get("diagnostic_event") if isinstance(d, dict) else None
        if not (diag and diag.get("severity") == "debug"):
            events.append(d)
        if on_event is not None:
            on_event(d)

    return collect


def _lock_takeover(ctx: "Context | None", stack: str, op: str) -> Callable[[Any, str], None] | None:
    """The audit of taking over Pulumi's lock on ``stack`` from a provably dead holder (None: no
    takeover, a held lock stays an error)."""
    if ctx is None:
        return None
    from dn import audit

    where = ({"host": stack[len(HOST_STACK_PREFIX):]} if stack.startswith(HOST_STACK_PREFIX) else {"tenant": stack})

    def took(lock: Any, why: str) -> None:
        audit.record_takeover(ctx, f"stack:{stack}", lock.to_dict(), why, op, **where)

    return took


def run_stack(settings: "Settings", st: Any, op: str, *, on_event: OnEvent | None = None,
              policy: bool = True, events: list[dict] | None = None, ctx: "Context | None" = None) -> RunResult:
    """Run ``op`` (up / preview / refresh / refresh-preview / destroy) on an open stack, collecting
    its events into ``events`` (kept by the caller also when the run raises); the policy pack
    gates up and preview. With ``ctx`` (a caller holding the stack's dn lock), Pulumi's stack lock
    left by a provably dead run is taken over, audited. ``destroy`` removes the stack with every
    copy of its state and its work dir (``RunResult.purge`` says what was removed and checked)."""
    from dn import engine

    res = RunResult(st.name, op, events=events if events is not None else [])
    cb = _collector(res.events, on_event)
    kw = _policy_args(settings) if policy and op in ("up", "preview") else {}
    takeover = {"on_lock_takeover": _lock_takeover(ctx, st.name, op),
                "stale_after": settings.database.lock_stale_after}
    if op == "up":
        out = engine.up(st, on_event=cb, **takeover, **kw)
        res.outputs = out.outputs
    elif op == "preview":
        out = engine.preview(st, on_event=cb, **kw)
    elif op == "refresh":
        out = engine.refresh(st, on_event=cb, **takeover)
    elif op == "refresh-preview":
        out = engine.refresh(st, on_event=cb, preview_only=True)
    elif op == "destroy":
        out = engine.destroy(st, on_event=cb, remove=True, **takeover)
        res.purge = out.purge.to_dict() if out.purge else None
        _require_purged(res.purge)
    else:
        raise ValueError(op)
    res.changes = out.changes
    return res


def _require_purged(purge: dict[str, Any] | None) -> None:
    """A removed stack whose state still has copies (a file naming it or holding its ciphertexts)
    is a failure, not a success to report."""
    if purge and purge.get("remaining"):
        raise OperationFailed(f"the stack was removed but copies of its state remain: {', '.join(purge['remaining'])}",
                              where=f"stack {purge.get('stack')}", hint="remove them and rerun the same command")


def _stack_exists(settings: "Settings", name: str) -> bool:
    from dn import engine

    return (engine.stack_work_dir(settings, name) / f"Pulumi.{name}.yaml").exists()


# ---------------------------------------------------------------------------------------------
# operations


def _insert(conn: "Connection", plan: Plan) -> int:
    from dn import db

    with db.translate_errors("registering the tenant"), conn.transaction():
        r = db.row(conn, "INSERT INTO tenants (slug, display_name, plan, host, status) VALUES (%s, %s, %s, %s, 'active') "
                         "RETURNING id", (plan.spec.slug, plan.display_name, plan.spec.plan, plan.host.name))
        assert r is not None
        _write_spec(conn, r["id"], plan.spec)
    return int(r["id"])


def create(ctx: "Context", req: TenantRequest, *, dry_run: bool = False, on_event: OnEvent | None = None,
           on_plan: Callable[[Plan], None] | None = None) -> tuple[Plan, RunResult | None]:
    """Create a tenant (or finish one whose first ``up`` failed): validate, plan, then register,
    open its stack, set its secrets and apply, under the tenant's and host's lock, audited."""
    from dn import audit

    settings = ctx.settings
    host_name = req.host or settings.default_host
    check_create_request(settings, req)  # before any I/O: bad input is exit 2 even with the database down
    with connect(settings, "tenant create") as conn:
        plan = plan_create(settings, conn, req, lambda: docker_subnets(settings, host_name))
    plan.docker_backend = docker_backend(settings, ctx.environ)
    check_certificate(settings, plan.host, plan.spec)
    if on_plan:
        on_plan(plan)
    if dry_run:
        return plan, None
    args = {**req.audit_args(), "plan_action": plan.action, "subnet": plan.spec.subnet}
    with audit.privileged(ctx, "tenant create", args, tenant=plan.spec.slug, host=plan.host.name) as op:
        with connect(settings, "tenant create") as conn:
            # again under the lock: the registry may have moved
            plan = plan_create(settings, conn, req, lambda: docker_subnets(settings, host_name))
            if plan.action == "create":
                _insert(conn, plan)
            op.args.update(plan_action=plan.action, subnet=plan.spec.subnet)
            plan.docker_backend = docker_backend(settings, ctx.environ)
        st = tenant_stack(settings, plan.spec, plan.others, ctx.environ, host=plan.host.name)
        op.args["secrets_written"] = ensure_secrets(settings, st, _read_container_config(req))
        result = run_stack(settings, st, "up", on_event=on_event, ctx=ctx)
        op.args["changes"] = result.changes
    return plan, result


def update(ctx: "Context", req: TenantRequest, *, dry_run: bool = False, on_event: OnEvent | None = None,
           on_plan: Callable[[Plan], None] | None = None) -> tuple[Plan, RunResult | None]:
    """Change a tenant's spec (domains, plan, image, CONTAINER_CONFIG, preview server, schedule,
    status) and apply it."""
    from dn import audit

    settings = ctx.settings
    check_update_request(settings, req)  # before any I/O
    with connect(settings, "tenant update") as conn:
        plan = plan_update(settings, conn, req)
    plan.docker_backend = docker_backend(settings, ctx.environ)
    if "domains" in plan.changes:
        check_certificate(settings, plan.host, plan.spec)
    if on_plan:
        on_plan(plan)
    if dry_run:
        return plan, None
    with audit.privileged(ctx, "tenant update", req.audit_args(), tenant=plan.spec.slug, host=plan.host.name) as op:
        verify_host(settings, plan.host.name)  # before the registry changes: an up with no diff contacts no host
        with connect(settings, "tenant update") as conn:
            plan = plan_update(settings, conn, req)
            op.args["changes_requested"] = sorted(plan.changes)
            from dn import db

            with db.translate_errors("updating the tenant registry"), conn.transaction():
                assert plan.before is not None
                conn.execute("UPDATE tenants SET plan = %s, display_name = %s, status = %s WHERE id = %s",
                             (plan.spec.plan, plan.display_name,
                              req.status if req.status is not None else plan.before.status, plan.before.id))
                _write_spec(conn, plan.before.id, plan.spec)
        st = tenant_stack(settings, plan.spec, plan.others, ctx.environ, host=plan.host.name)
        ensure_secrets(settings, st, _read_container_config(req))
        result = run_stack(settings, st, "up", on_event=on_event, ctx=ctx)
        op.args["changes"] = result.changes
    return plan, result


@dataclass
class OpenWork:
    what: str
    detail: str


def open_work(conn: "Connection", rec: TenantRecord, *, except_request: int | None = None) -> list[OpenWork]:
    """GDPR requests and restores still open for the tenant. Tables that do not exist (yet) hold
    nothing open."""
    from dn import db

    out: list[OpenWork] = []
    with db.translate_errors("checking open GDPR requests and restores"):
        have = {r["name"] for r in db.rows(conn, """
            SELECT c.relname AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')
               AND c.relname IN ('deletion_requests', 'gdpr_runs', 'restores', 'dr_restores', 'restore_requests')""")}
        if "deletion_requests" in have:
            for r in db.rows(conn, "SELECT id, status, due_at FROM deletion_requests "
                                   "WHERE tenant_id = %s AND completed_at IS NULL ORDER BY id", (rec.id,)):
                if r["id"] != except_request:
                    out.append(OpenWork("GDPR deletion request", f"#{r['id']} ({r['status']}, due {r['due_at']:%Y-%m-%d})"))
        if "gdpr_runs" in have:
            for r in db.rows(conn, "SELECT request_id FROM gdpr_runs WHERE tenant_id = %s AND finished_at IS NULL",
                             (rec.id,)):
                if r["request_id"] != except_request and not any(f"#{r['request_id']} " in w.detail for w in out):
                    out.append(OpenWork("GDPR deletion run", f"request #{r['request_id']} not finished"))
        for table in sorted(have & {"restores", "dr_restores", "restore_requests"}):
            out += _open_restores(conn, table, rec)
        # a platform restore rewrites every tenant's rows while it runs
        held = db.rows(conn, "SELECT resource, command FROM op_locks WHERE resource = 'db:dr-restore'") \
            if _table_exists(conn, "op_locks") else []
        for r in held:
            out.append(OpenWork("restore", f"{r['command']} is running (lock {r['resource']})"))
    return out


def _table_exists(conn: "Connection", name: str) -> bool:
    from dn import db

    r = db.row(conn, "SELECT to_regclass(%s) IS NOT NULL AS ok", (name,))
    return bool(r and r["ok"])


def _open_restores(conn: "Connection", table: str, rec: TenantRecord) -> list[OpenWork]:
    from psycopg import sql

    from dn import db

    cols = {r["column_name"] for r in db.rows(conn, "SELECT column_name FROM information_schema.columns "
                                                    "WHERE table_schema = current_schema() AND table_name = %s", (table,))}
    who = next(((c, rec.id) for c in ("tenant_id",) if c in cols), None) or \
        next(((c, rec.slug) for c in ("tenant_slug", "tenant") if c in cols), None)
    done = next((c for c in ("finished_at", "completed_at", "ended_at") if c in cols), None)
    if who is None or done is None:
        # an unknown shape: refuse rather than guess that nothing is open
        return [OpenWork("restore", f"table {table} exists but dn cannot tell whether a restore is open")]
    q = sql.SQL("SELECT count(*) AS n FROM {} WHERE {} = %s AND {} IS NULL").format(
        sql.Identifier(table), sql.Identifier(who[0]), sql.Identifier(done))
    n = db.row(conn, q.as_string(conn), (who[1],))
    return [OpenWork("restore", f"{n['n']} open in {table}")] if n and n["n"] else []


@dataclass
class DestroyResult:
    tenant: str
    run: RunResult | None
    registry: str  # "deleted" or "cancelled" (rows still reference it)

    def to_dict(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "registry": self.registry, "run": self.run.to_dict() if self.run else None}


def destroy(ctx: "Context", slug: str, *, confirm: Callable[[TenantRecord, list[dict]], bool],
            on_event: OnEvent | None = None) -> DestroyResult:
    """Remove a tenant from its host: every resource of its stack (containers, network, vhost,
    firewall chains, LUKS volume crypto-erased, timers), the stack itself, its backup keys
    (crypto-shredded everywhere, so its backups are unreadable), and its registry entry.
    Refused while a GDPR request or a restore is open for it. ``confirm`` sees the tenant and its
    resources and may say no (nothing happens)."""
    from dn import audit
    from dn.backup import keys
    from dn.backup import run as backups

    settings = ctx.settings
    with connect(settings, "tenant destroy") as conn:
        rec = require_tenant(conn, slug)
        _refuse_open_work(conn, rec)
    spec = rec.host_view(settings)
    host = _host_of(settings, rec.host)
    if not confirm(rec, describe(spec, host, settings.retention.backup_daily_days)):
        raise InvalidInput("confirmation", "not confirmed: nothing was destroyed")
    with audit.privileged(ctx, "tenant destroy", {"tenant": slug}, tenant=slug, host=rec.host) as op:
        with connect(settings, "tenant destroy") as conn:
            rec = require_tenant(conn, slug)
            _refuse_open_work(conn, rec)  # again under the lock
            others = [o for o in list_tenants(conn, host=rec.host) if o.slug != slug]
        run = destroy_stack(ctx, spec, others, host=rec.host, on_event=on_event)
        op.args["changes"] = run.changes if run else {}
        # before the registry entry goes: a tenant later created under this slug is another
        # identity and must not inherit this one's backups (dn.backup.keys owner names)
        owner = keys.owner_for(slug, rec.id, rec.created_at)
        op.args["backup_keys_destroyed"] = backups.shred(settings, ctx.environ, slug, owner)["key_ids"]
        with connect(settings, "tenant destroy") as conn:
            registry = _unregister(conn, rec)
        op.args["registry"] = registry
    return DestroyResult(slug, run, registry)


def destroy_stack(ctx: "Context", spec: TenantSpec, others: Sequence[TenantRecord], *,
                  host: str | None = None, on_event: OnEvent | None = None) -> RunResult | None:
    """Destroy and remove a tenant's stack, without locking or auditing: for callers that hold
    the tenant's lock inside their own audited operation (the GDPR deletion workflow). ``host``
    defaults to the tenant's registered host."""
    settings = ctx.settings
    if not _stack_exists(settings, spec.slug):
        # removed already (a rerun after a failure or a crash): what an earlier removal left still goes
        from dn import engine

        _require_purged(engine.purge_stack(settings.backend_url, engine.stack_work_dir(settings, spec.slug).parent,
                                           spec.slug).to_dict())
        return None
    if host is None:
        with connect(settings, "destroy stack") as conn:
            rec = get_tenant(conn, spec.slug)
        host = rec.host if rec is not None else settings.default_host
    verify_host(settings, host)  # the crypto-erase and every removal go to the host the current pin names
    st = tenant_stack(settings, spec, others, ctx.environ, host=host)
    return run_stack(settings, st, "destroy", on_event=on_event, ctx=ctx)


def _refuse_open_work(conn: "Connection", rec: TenantRecord) -> None:
    work = open_work(conn, rec)
    if work:
        raise InvalidInput("tenant", f"{rec.slug!r} has open work: " + "; ".join(f"{w.what} {w.detail}" for w in work),
                           hint="finish it first (`dn gdpr status`, `dn dr status`)")


def _unregister(conn: "Connection", rec: TenantRecord) -> str:
    """Delete the tenant's registry entry, or, when other rows still reference it (users,
    invoices, ...), mark it cancelled so the GDPR deletion job handles its data."""
    import psycopg

    from dn import db

    with db.translate_errors("removing the tenant from the registry"):
        try:
            with conn.transaction():
                conn.execute("DELETE FROM tenant_settings WHERE tenant_id = %s", (rec.id,))
                conn.execute("DELETE FROM tenants WHERE id = %s", (rec.id,))
            return "deleted"
        except psycopg.errors.ForeignKeyViolation:
            with conn.transaction():
                conn.execute("UPDATE tenants SET status = 'cancelled', cancelled_at = coalesce(cancelled_at, now()) "
                             "WHERE id = %s AND status IN ('active', 'suspended')", (rec.id,))
            return "cancelled"


def show(ctx: "Context", slug: str) -> dict[str, Any]:
    """A tenant's registry entry, its resources on the host and its stack's last update."""
    settings = ctx.settings
    with connect(settings, "tenant show") as conn:
        rec = require_tenant(conn, slug)
        others = [o for o in list_tenants(conn, host=rec.host) if o.slug != slug]
    spec = rec.host_view(settings)
    host = _host_of(settings, rec.host)
    data: dict[str, Any] = {"tenant": rec.to_dict(),
                            "resources": describe(spec, host, settings.retention.backup_daily_days)}
    if not _stack_exists(settings, slug):
        data["stack"] = {"name": slug, "exists": False}
        return data
    from dn import engine

    try:
        data["stack"] = engine.stack_info(tenant_stack(settings, spec, others, ctx.environ, host=rec.host))
    except DnError as e:  # the registry answer is still worth showing
        data["stack"] = {"name": slug, "exists": True, "error": str(e)}
    return data


# ---------------------------------------------------------------------------------------------
# runs over several stacks: dn up / preview / refresh


@dataclass
class Target:
    kind: str  # "host" or "tenant"
    name: str
    host: str


def targets(settings: "Settings", conn: "Connection", *, tenant: str | None = None, host: str | None = None,
            all_: bool = False) -> list[Target]:
    """The stacks an operation runs on: one tenant, one host's baseline, or every host baseline
    then every tenant (``all_``)."""
    if sum(bool(x) for x in (tenant, host, all_)) != 1:
        raise InvalidInput("selection", "give exactly one of --tenant SLUG, --host NAME or --all")
    if tenant:
        rec = require_tenant(conn, tenant)
        if rec.status not in DEPLOYED:
            raise InvalidInput("tenant", f"tenant {rec.slug!r} is {rec.status}: it has no stack to run")
        return [Target("tenant", rec.slug, rec.host)]
    if host:
        settings.host(host)
        return [Target("host", host, host)]
    out = [Target("host", h, h) for h in sorted(settings.hosts)]
    out += [Target("tenant", r.slug, r.host) for r in list_tenants(conn)
            if r.host in settings.hosts and r.status in DEPLOYED]
    return out


def open_target(ctx: "Context", t: Target, conn: "Connection"):
    settings = ctx.settings
    if t.kind == "host":
        return host_stack(settings, _host_of(settings, t.host), ctx.environ)
    rec = require_tenant(conn, t.name)
    others = [o for o in list_tenants(conn, host=rec.host) if o.slug != rec.slug]
    return tenant_stack(settings, rec.host_view(settings), others, ctx.environ, host=rec.host)


def stack_name(t: Target) -> str:
    return host_stack_name(t.name) if t.kind == "host" else t.name


def up_targets(ctx: "Context", sel: list[Target], *, on_event: OnEvent | None = None,
               verified: set[str] | None = None) -> list[RunResult]:
    """``pulumi up`` of each selected stack, each under its own lock and audit entry, its host's
    pinned key verified first (``verify_host``; ``verified`` carries the run's checks across
    calls). Stops at the first failure (the error names the stack; earlier stacks stay applied)."""
    from dn import audit

    settings = ctx.settings
    verified = set() if verified is None else verified
    results = []
    for t in sel:
        kw = {"tenant": t.name, "host": t.host} if t.kind == "tenant" else {"host": t.host}
        with audit.privileged(ctx, "up", {"stack": stack_name(t)}, **kw) as op:
            # even with nothing to change the engine would contact no host: verify it first
            verify_host(settings, t.host, verified)
            with connect(settings, "up") as conn:
                st = open_target(ctx, t, conn)
            if t.kind == "tenant":
                ensure_secrets(settings, st, None)
            r = run_stack(settings, st, "up", on_event=on_event, ctx=ctx)
            op.args["changes"] = r.changes
            results.append(r)
    return results


def preview_targets(ctx: "Context", sel: list[Target], *, on_event: OnEvent | None = None,
                    policy: bool = True):
    """Preview every selected stack (never changes anything, so no lock and no audit entry) and
    build the preview model. A stack that fails is recorded with its error; the others go on.
    A stack previewed for the first time is created (empty) in the state backend."""
    from dn import preview as pv
    from dn.errors import PolicyViolation

    settings = ctx.settings
    out = pv.Preview()
    packs = [str(p) for p in _policy_args(settings)["policy_packs"]] if policy else []
    for t in sel:
        name = stack_name(t)
        events: list[dict] = []
        error = None
        try:
            with connect(settings, "preview") as conn:
                st = open_target(ctx, t, conn)
            run_stack(settings, st, "preview", on_event=on_event, policy=policy, events=events)
        except PolicyViolation as e:
            # the violations are in the events; without them, the message is all there is
            if not any(isinstance(ev, dict) and "policy_event" in ev for ev in events):
                error = str(e)
        except DnError as e:
            error = str(e)
        out.stacks.append(pv.stack_from_events(name, events, error=error, policy_packs=packs))
    return out


# ---------------------------------------------------------------------------------------------
# the host baseline stack


def host_up(ctx: "Context", host_name: str | None = None, *, on_event: OnEvent | None = None) -> RunResult:
    """Apply the host baseline stack (firewall baseline, nginx main config, timers, directories)
    under the host's lock, audited."""
    from dn import audit

    settings = ctx.settings
    host = _host_of(settings, host_name)
    with audit.privileged(ctx, "host up", {"host": host.name}, host=host.name) as op:
        verify_host(settings, host.name)
        st = host_stack(settings, host, ctx.environ)
        r = run_stack(settings, st, "up", on_event=on_event, ctx=ctx)
        op.args["changes"] = r.changes
    return r


def host_destroy(ctx: "Context", host_name: str | None = None, *, on_event: OnEvent | None = None) -> RunResult | None:
    """Remove the host baseline (timers, nginx main config, firewall baseline, dn's empty
    directories) and its stack. Refused while tenants are registered on the host: their isolation
    and their vhosts depend on the baseline. Audited, holds the host's lock."""
    from dn import audit

    settings = ctx.settings
    host = _host_of(settings, host_name)
    name = host_stack_name(host.name)
    with connect(settings, "host destroy") as conn:
        left = [r.slug for r in list_tenants(conn, host=host.name)]
    if left:
        raise InvalidInput("host", f"tenants are still registered on {host.name}: {', '.join(left)}",
                           hint="destroy them first (`dn tenant destroy SLUG`)")
    with audit.privileged(ctx, "host destroy", {"host": host.name}, host=host.name) as op:
        verify_host(settings, host.name)
        if not _stack_exists(settings, name):
            op.args["changes"] = {}
            return None
        r = run_stack(settings, host_stack(settings, host, ctx.environ), "destroy", on_event=on_event, ctx=ctx)
        op.args["changes"] = r.changes
    return r


def host_show(ctx: "Context", host_name: str | None = None) -> dict[str, Any]:
    """A host's baseline spec and its stack's last update."""
    settings = ctx.settings
    host = _host_of(settings, host_name)
    name = host_stack_name(host.name)
    data: dict[str, Any] = {"host": host.model_dump(mode="json"), "stack": {"name": name, "exists": False}}
    with connect(settings, "host show") as conn:
        data["tenants"] = [r.slug for r in list_tenants(conn, host=host.name)]
    if _stack_exists(settings, name):
        from dn import engine

        try:
            data["stack"] = engine.stack_info(host_stack(settings, host, ctx.environ))
        except DnError as e:
            data["stack"] = {"name": name, "exists": True, "error": str(e)}
    return data


def refresh_targets(ctx: "Context", sel: list[Target], *, preview_only: bool = False,
                    on_event: OnEvent | None = None) -> list:
    """Read every resource of the selected stacks back from the host and return what changed
    behind dn's back (``dn.preview.Drift``). Unless ``preview_only``, the state records what was
    found (audited, locked), so the next ``dn up`` puts the declared configuration back."""
    from dn import audit
    from dn import preview as pv

    settings = ctx.settings
    drifts: list = []
    verified: set[str] = set()
    for t in sel:
        name = stack_name(t)
        if not _stack_exists(settings, name):
            # nothing to read back, but "no drift" is a statement about the host: verify it
            verify_host(settings, t.host, verified)
            continue
        events: list[dict] = []
        if preview_only:
            verify_host(settings, t.host, verified)
            with connect(settings, "refresh") as conn:
                st = open_target(ctx, t, conn)
            run_stack(settings, st, "refresh-preview", on_event=on_event, events=events)
        else:
            kw = {"tenant": t.name, "host": t.host} if t.kind == "tenant" else {"host": t.host}
            with audit.privileged(ctx, "refresh", {"stack": name}, **kw) as op:
                verify_host(settings, t.host, verified)
                with connect(settings, "refresh") as conn:
                    st = open_target(ctx, t, conn)
                run_stack(settings, st, "refresh", on_event=on_event, events=events, ctx=ctx)
                found = pv.drift_from_events(name, events)
                op.args["drift"] = [f"{d.kind} {d.name} {d.how}" for d in found]
        drifts += pv.drift_from_events(name, events)
    return drifts
