"""The tenant component ``dn:tenant:Tenant``: everything one tenant has on its EU host.

One child per promise of the trust page:

===========================  =================================================================
child (Pulumi name)          promise
===========================  =================================================================
``<slug>-docker``            (pulumi-docker backend) docker reached over ``ssh://`` with the host
                             key pinned (``StrictHostKeyChecking=yes`` against the known_hosts
                             file dn writes): no daemon socket is ever exposed on the network
``<slug>-network``           a bridge of its own (fixed name ``dnt<hash>``), inter-container
                             traffic off (``enable_icc=false``), a fixed subnet: per-tenant
                             network isolation
``<slug>-tagging``,          the sGTM servers: no published port (only nginx is public), restart
``<slug>-preview``           unless-stopped, memory/CPU from the plan, every capability dropped
                             (NET_RAW included), no-new-privileges, rotated logs, a health check
                             on /healthz, attached only to the tenant network; CONTAINER_CONFIG
                             is a Pulumi secret
``<slug>-firewall``          the tenant's iptables chains (isolation from other tenants and host
                             services); before the network and the containers, which depend on
                             it (until it is in place the baseline drops the bridge's traffic)
``<slug>-nginx-vhost``       TLS 1.2/1.3, HSTS, rate limits per IP and per tenant
``<slug>-luks-volume``       LUKS2 aes-xts-plain64 with a 512-bit key; the key is a Pulumi secret
``<slug>-backup-timer``      the daily backup of the tenant (30-day retention)
===========================  =================================================================

Two docker backends make the same promises (``dn.host.docker.docker_backend`` chooses):
``pulumi-docker`` (the provider plugin, over ``ssh://``) and ``dn-ssh`` (dn's own dynamic
providers in ``stacks/providers/docker.py``, over dn's SSH layer, for machines where the plugin
cannot be installed). Switching a stack between them replaces its network and containers.

The component takes validated specs only (``dn.models``); it renders nothing itself: the dynamic
resources of ``stacks/providers`` render and apply their files over SSH.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pulumi

from dn.models import TENANT_PORT, HostBaseline, TenantSpec, parse_image
from dn.host.docker import preview_server_url
from dn.preview import resource_name

TYPE = "dn:tenant:Tenant"

# Rotated container logs: at most LOG_MAX_FILES x LOG_MAX_SIZE per container on the host.
LOG_MAX_SIZE = "10m"
LOG_MAX_FILES = "3"
HEALTH_PATH = "/healthz"
DROP_CAPABILITIES = ("ALL",)
SECURITY_OPTS = ("no-new-privileges:true",)
RESTART = "unless-stopped"
# The official sGTM image is distroless (no shell, no wget): its health check runs node itself.
SGTM_IMAGE = "gcr.io/cloud-tagging-10302018/gtm-cloud-image"
_NODE_PROBE = (
    "require('http').get('http://127.0.0.1:%d%s',r=>process.exit(r.statusCode===200?0:1))"
    ".on('error',()=>process.exit(1))" % (TENANT_PORT, HEALTH_PATH)
)


def health_test(image: str) -> list[str]:
    """The health-check command for ``image``: node for the distroless sGTM image, wget otherwise."""
    ref = parse_image(image)
    if ref.name == SGTM_IMAGE:
        return ["CMD", "/nodejs/bin/node", "-e", _NODE_PROBE]
    return ["CMD", "wget", "-q", "-O", "/dev/null", f"http://127.0.0.1:{TENANT_PORT}{HEALTH_PATH}"]


@dataclass(frozen=True)
class DockerEndpoint:
    """How the docker provider reaches the host's daemon: ``ssh://user@host:port`` through the
    local OpenSSH client, which must find the pinned key in ``known_hosts`` and never learn one."""

    url: str
    key_path: str
    known_hosts: str

    def ssh_opts(self) -> list[str]:
        return [
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-i", self.key_path,
        ]


@dataclass(frozen=True)
class TenantArgs:
    """Inputs of one tenant: validated specs plus the secrets as Pulumi secrets.

    ``container_config`` and ``luks_key`` must be secret Outputs (``pulumi.Output.secret`` or a
    secret config value). ``host_resources`` builds the dynamic children (nginx, iptables, LUKS,
    timer); see :func:`stacks.programs.tenant_program`.
    """

    spec: TenantSpec
    host: HostBaseline
    docker: DockerEndpoint
    container_config: pulumi.Output
    luks_key: pulumi.Output
    ssh: dict = field(default_factory=dict)  # stacks.programs.ssh_target_data of the host
    docker_backend: str = "pulumi-docker"  # or "dn-ssh"
    other_bridges: Sequence[str] = field(default_factory=tuple)
    backup_retention_days: int = 30
    schedules: dict = field(default_factory=dict)  # settings.schedules, for the backup timer


def container_envs(spec: TenantSpec, container_config: pulumi.Output, *, preview_server: bool) -> pulumi.Output:
    """The environment of a tagging or preview server, as one secret list (it holds CONTAINER_CONFIG)."""
    fixed = [f"PORT={TENANT_PORT}"]
    if preview_server:
        fixed.append("RUN_AS_PREVIEW_SERVER=true")
    elif spec.preview:
        fixed.append(f"PREVIEW_SERVER_URL={preview_server_url(spec)}")
    return pulumi.Output.secret(container_config).apply(lambda cfg: [f"CONTAINER_CONFIG={cfg}", *fixed])


class Tenant(pulumi.ComponentResource):
    """One tenant on its EU host (type ``dn:tenant:Tenant``)."""

    def __init__(self, args: TenantArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        spec = args.spec
        super().__init__(TYPE, spec.slug, None, opts)
        if args.docker_backend not in ("dn-ssh", "pulumi-docker"):
            raise ValueError(f"docker_backend {args.docker_backend!r}: pulumi-docker or dn-ssh")
        from stacks.programs import tenant_firewall

        # first: no container of the tenant may start before its chains exist
        self.firewall = tenant_firewall(self, args)
        if args.docker_backend == "dn-ssh":
            self._dn_ssh(args)
        elif args.docker_backend == "pulumi-docker":
            self._pulumi_docker(args)
        else:
            raise ValueError(f"docker_backend {args.docker_backend!r}: pulumi-docker or dn-ssh")

        from stacks.programs import tenant_host_resources

        self.host_resources = tenant_host_resources(self, args)

        self.register_outputs({
            "network": self.network.name,
            "bridge": spec.bridge,
            "subnet": spec.subnet,
            "tagging": self.tagging.name,
            "preview": self.preview.name if self.preview else None,
        })

    def _dn_ssh(self, args: TenantArgs) -> None:
        from stacks.providers.docker import tenant_docker

        spec = args.spec
        self.provider = None
        self.network, containers = tenant_docker(
            spec, args.ssh, args.container_config, name=lambda suffix: resource_name(spec.slug, suffix),
            health_test=health_test(spec.image), opts=pulumi.ResourceOptions(parent=self, depends_on=[self.firewall]),
        )
        self.tagging = containers[0]
        self.preview = containers[1] if len(containers) > 1 else None

    def _pulumi_docker(self, args: TenantArgs) -> None:
        import pulumi_docker as docker

        spec = args.spec
        name = lambda suffix: resource_name(spec.slug, suffix)  # noqa: E731
        self.provider = docker.Provider(
            name("docker"),
            host=args.docker.url,
            ssh_opts=args.docker.ssh_opts(),
            opts=pulumi.ResourceOptions(parent=self),
        )
        on_host = pulumi.ResourceOptions(parent=self, provider=self.provider, depends_on=[self.firewall])
        self.network = docker.Network(
            name("network"),
            name=spec.network,
            driver="bridge",
            internal=False,  # sGTM forwards hits to the tag vendors: it needs egress
            attachable=False,
            ipv6=False,
            options={
                "com.docker.network.bridge.name": spec.bridge,
                "com.docker.network.bridge.enable_icc": "false",
                "com.docker.network.bridge.enable_ip_masquerade": "true",
            },
            labels=[
                docker.NetworkLabelArgs(label="dn.tenant", value=spec.slug),
                docker.NetworkLabelArgs(label="dn.managed", value="true"),
            ],
            ipam_configs=[docker.NetworkIpamConfigArgs(subnet=spec.subnet, gateway=spec.gateway)],
            opts=on_host,
        )
        self.tagging = self._server(docker, args, "tagging", spec.tagging_container, spec.tagging_address, on_host)
        self.preview = (self._server(docker, args, "preview", spec.preview_container, spec.preview_address, on_host)
                        if spec.preview else None)

    def _server(self, docker, args: TenantArgs, role: str, container_name: str, address: str,
                on_host: pulumi.ResourceOptions):
        spec, lim = args.spec, args.spec.limits
        memory = lim.memory_mb
        return docker.Container(
            resource_name(spec.slug, role),
            name=container_name,
            image=spec.image,
            envs=container_envs(spec, args.container_config, preview_server=role == "preview"),
            # only nginx is public: no ``ports`` at all, so nothing is published on the host
            publish_all_ports=False,
            network_mode=spec.network,
            networks_advanced=[docker.ContainerNetworksAdvancedArgs(name=self.network.name, ipv4_address=address)],
            restart=RESTART,
            must_run=True,
            memory=memory,
            memory_swap=memory,  # no swap beyond the memory limit
            cpus=f"{lim.cpus:g}",
            capabilities=docker.ContainerCapabilitiesArgs(drops=list(DROP_CAPABILITIES)),
            security_opts=list(SECURITY_OPTS),
            privileged=False,
            read_only=True,
            tmpfs={"/tmp": "rw,noexec,nosuid,nodev,size=64m"},
            log_driver="json-file",
            log_opts={"max-size": LOG_MAX_SIZE, "max-file": LOG_MAX_FILES},
            healthcheck=docker.ContainerHealthcheckArgs(
                tests=health_test(spec.image), interval="10s", timeout="5s", retries=3, start_period="20s",
            ),
            labels=[
                docker.ContainerLabelArgs(label="dn.tenant", value=spec.slug),
                docker.ContainerLabelArgs(label="dn.managed", value="true"),
                docker.ContainerLabelArgs(label="dn.role", value=role),
            ],
            opts=pulumi.ResourceOptions.merge(on_host, pulumi.ResourceOptions(depends_on=[self.network])),
        )


def known_hosts_path(data_dir: Path, host: str) -> Path:
    """Where dn writes the pinned host key of ``host`` for OpenSSH (pulumi-docker's ssh://)."""
    return Path(data_dir) / "ssh" / f"{host}.known_hosts"
