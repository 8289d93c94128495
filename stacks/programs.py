"""Inline Pulumi programs for dn's engine: one per tenant stack, one per host baseline stack.

``tenant_program(inputs)`` / ``host_program(inputs)`` return the zero-argument function the
Automation API runs in-process (``dn.engine.stack``). Their inputs are plain, validated data made
by ``tenant_inputs`` / ``host_inputs`` from the settings and the registry; the secrets are not in
them: the programs read ``dn:containerConfig`` and ``dn:luksKey`` from the stack's config as
Pulumi secrets, so they stay encrypted in the state and masked in every event and output.

The host resources are the dynamic providers of ``stacks/providers``; the engine runs them in a
separate process that imports them by module name (``provider_env`` puts dn's checkout on its
``PYTHONPATH``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from dn.models import BRIDGE_PREFIX, HostBaseline, TenantSpec, host_view_data, parse_host, parse_tenant

if TYPE_CHECKING:
    from dn.config import HostConfig, Settings

REPO = Path(__file__).resolve().parent.parent
POLICY_PACK = REPO / "policies"


def provider_env() -> dict[str, str]:
    """Environment for the engine's provider processes: they import ``stacks.providers`` and
    ``dn`` from this checkout."""
    current = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": os.pathsep.join([str(REPO), current]) if current else str(REPO)}


def policy_config(settings: "Settings") -> dict[str, Any]:
    """The policy pack's configuration from dn's settings (``--policy-pack-config``)."""
    return {
        "all": "mandatory",
        "dn-allowed-registries": {"allowedRegistries": list(settings.images.allowed_registries)},
        "dn-backup-schedule": {"retentionDays": settings.retention.backup_daily_days},
    }


def policy_pack_args(settings: "Settings") -> dict[str, Any]:
    """``policy_packs`` / ``policy_pack_configs`` for engine.up / engine.preview: dn's pack run
    through its launcher (no pulumi-language-python needed), configured from the settings."""
    import json

    from dn import tooling

    launcher = tooling.policy_pack_launcher(POLICY_PACK, Path(settings.data_dir))
    cfg = launcher.parent / "config.json"
    text = json.dumps(policy_config(settings), indent=2, sort_keys=True) + "\n"
    if not cfg.exists() or cfg.read_text() != text:
        tmp = cfg.with_name(f".config.{os.getpid()}.json")
        tmp.write_text(text)
        os.replace(tmp, cfg)
    return {"policy_packs": [str(launcher)], "policy_pack_configs": [str(cfg)]}


# ---------------------------------------------------------------------------------------------
# SSH to the host, for the docker provider (OpenSSH) and the dynamic providers (dn.ssh)


def ssh_target_data(h: "HostConfig") -> dict[str, Any]:
    """The host's SSH target as plain data a dynamic provider carries (paths and the pinned key,
    never a key's content)."""
    return h.model_dump(mode="json", include={"address", "port", "user", "key_path", "host_key", "known_hosts",
                                              "connect_timeout", "command_timeout"}, exclude_none=True)


def write_known_hosts(settings: "Settings", host_name: str) -> Path:
    """A known_hosts file holding exactly the host's pinned key, for OpenSSH (pulumi-docker's
    ``ssh://``): from ``host_key``, or the pinned lines of the configured ``known_hosts``. dn
    writes it; OpenSSH never adds to it (StrictHostKeyChecking=yes)."""
    from dn import ssh
    from stacks.tenant import known_hosts_path

    h = settings.host(host_name)
    name = ssh.known_hosts_name(h.address, h.port)
    known_text = Path(h.known_hosts).read_text() if h.known_hosts and Path(h.known_hosts).exists() else None
    pinned = ssh.pinned_keys_for(h.address, h.port, h.host_key, known_text,
                                 str(h.known_hosts) if h.known_hosts else None)
    trusted = [k for k in pinned.keys if k not in pinned.revoked]
    if not trusted:
        from dn.errors import HostKeyError

        raise HostKeyError(f"host {host_name}: no host key is pinned for {name} (or every pinned one is @revoked)",
                           hint="set hosts.<name>.host_key or known_hosts: dn never learns a host key by connecting")
    # @revoked lines too: OpenSSH then refuses a revoked key even where another source pins it
    lines = "".join(f"{name} {k.openssh()}\n" for k in trusted)
    lines += "".join(f"@revoked {name} {k.openssh()}\n" for k in pinned.revoked)
    path = known_hosts_path(Path(settings.data_dir), host_name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists() or path.read_text() != lines:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(lines)
        tmp.chmod(0o600)
        os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# tenant stacks


@dataclass(frozen=True)
class TenantInputs:
    """What a tenant program needs, as plain data (no secret)."""

    tenant: dict[str, Any]  # dn.models.host_view_data(spec)
    host: dict[str, Any]  # the HostBaseline
    ssh: dict[str, Any]  # ssh_target_data
    docker_url: str
    known_hosts: str
    docker_backend: str = "dn-ssh"
    other_bridges: tuple[str, ...] = ()
    backup_retention_days: int = 30
    schedules: dict[str, Any] = field(default_factory=dict)

    def spec(self) -> TenantSpec:
        return parse_tenant(self.tenant, host_view=True)

    def baseline(self) -> HostBaseline:
        return parse_host(self.host)


def tenant_inputs(settings: "Settings", spec: TenantSpec, others: Sequence[TenantSpec],
                  host_name: str | None = None, environ: Any = None) -> TenantInputs:
    name = host_name or settings.default_host
    h = settings.host(name)
    baseline = HostBaseline.from_settings(settings, name)
    return TenantInputs(
        tenant=host_view_data(spec),
        host=baseline.model_dump(mode="json"),
        ssh=ssh_target_data(h),
        docker_url=h.docker_url,
        known_hosts=str(write_known_hosts(settings, name)),
        docker_backend=docker_backend(settings, environ),
        # dn's own bridges (dnt...) are all isolated by the chains' "dnt+" match; only bridges
        # outside that scheme need naming
        other_bridges=tuple(sorted({o.bridge for o in others if not o.bridge.startswith(BRIDGE_PREFIX)})),
        backup_retention_days=settings.retention.backup_daily_days,
        schedules=settings.schedules.model_dump(mode="json"),
    )


def declare_tenant(inputs: TenantInputs) -> tuple[Any, dict[str, Any]]:
    """Declare one tenant (the ``dn:tenant:Tenant`` component) in the running program; returns
    the component and the stack outputs (no secret among them)."""
    import pulumi

    from stacks.tenant import DockerEndpoint, Tenant, TenantArgs

    cfg = pulumi.Config()
    spec = inputs.spec()
    t = Tenant(TenantArgs(
        spec=spec,
        host=inputs.baseline(),
        docker=DockerEndpoint(inputs.docker_url, inputs.ssh["key_path"], inputs.known_hosts),
        container_config=cfg.require_secret("containerConfig"),
        luks_key=cfg.require_secret("luksKey"),
        ssh=dict(inputs.ssh),
        docker_backend=inputs.docker_backend,
        other_bridges=inputs.other_bridges,
        backup_retention_days=inputs.backup_retention_days,
        schedules=dict(inputs.schedules),
    ))
    outputs = {
        "tenant": spec.slug,
        "network": t.network.name,
        "bridge": spec.bridge,
        "subnet": spec.subnet,
        "containers": [c.name for c in (t.tagging, t.preview) if c is not None],
        "domains": list(spec.domains),
        "docker_backend": inputs.docker_backend,
    }
    return t, outputs


def tenant_program(inputs: TenantInputs) -> Callable[[], None]:
    """The program of one tenant stack: the ``dn:tenant:Tenant`` component and its outputs."""

    def program() -> None:
        import pulumi

        _t, outputs = declare_tenant(inputs)
        for k, val in outputs.items():
            pulumi.export(k, val)

    return program


def tenant_firewall(parent, args) -> Any:
    """The tenant's firewall chains, a child of its component (``parent``), declared before the
    network and the containers, which depend on it: the chains are in place before any container
    of the tenant starts (they match the bridge by name, which need not exist yet). Until then,
    and if their apply fails, the baseline's default drop for tenant bridges holds."""
    import pulumi

    from dn.preview import resource_name
    from stacks.providers.firewall import TenantFirewall

    spec = args.spec
    return TenantFirewall(
        resource_name(spec.slug, "firewall"), ssh=args.ssh, host=args.host.model_dump(mode="json"),
        tenant=host_view_data(spec), other_bridges=list(args.other_bridges),
        opts=pulumi.ResourceOptions(parent=parent))


def tenant_host_resources(parent, args) -> dict[str, Any]:
    """The tenant's host resources as children of its component (``parent``, a
    ``stacks.tenant.Tenant`` whose firewall, network and containers exist): the firewall chains
    (``tenant_firewall``, made first), the vhost after the containers it proxies to, the LUKS
    volume with its key as a secret, the backup timer."""
    import pulumi

    from dn.preview import resource_name
    from stacks.providers.luks import LuksVolume
    from stacks.providers.nginx import NginxVhost
    from stacks.providers.timers import SystemdTimer

    spec = args.spec
    host = args.host.model_dump(mode="json")
    tenant = host_view_data(spec)
    child = pulumi.ResourceOptions(parent=parent)
    servers = [c for c in (parent.tagging, parent.preview) if c is not None]
    return {
        "firewall": parent.firewall,
        "vhost": NginxVhost(
            resource_name(spec.slug, "nginx-vhost"), ssh=args.ssh, host=host, tenant=tenant,
            opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=servers))),
        "volume": LuksVolume(
            resource_name(spec.slug, "luks-volume"), ssh=args.ssh, host=host, tenant=tenant,
            key=pulumi.Output.secret(args.luks_key), opts=child),
        "backup_timer": SystemdTimer(
            resource_name(spec.slug, "backup-timer"), ssh=args.ssh, host=host, unit=spec.backup_unit,
            tenant=tenant, schedules=dict(args.schedules), opts=child),
    }


# ---------------------------------------------------------------------------------------------
# host baseline stacks


@dataclass(frozen=True)
class HostInputs:
    host: dict[str, Any]  # the HostBaseline
    ssh: dict[str, Any]
    schedules: dict[str, Any]

    def baseline(self) -> HostBaseline:
        return parse_host(self.host)


def host_inputs(settings: "Settings", host: HostBaseline) -> HostInputs:
    return HostInputs(host=host.model_dump(mode="json"), ssh=ssh_target_data(settings.host(host.name)),
                      schedules=settings.schedules.model_dump(mode="json"))


def host_program(inputs: HostInputs) -> Callable[[], None]:
    """The program of one host baseline stack (see ``stacks/host.py``)."""

    def program() -> None:
        from stacks.host import host_baseline

        host_baseline(inputs)

    return program


def docker_backend(settings: "Settings", environ: Any = None) -> str:
    """The docker backend tenant stacks use here (``dn.host.docker.docker_backend``)."""
    from dn.host.docker import docker_backend as choose

    return choose(settings, environ)
