"""The host baseline stack of one EU host: what every tenant of the host shares.

===============================  ==============================================================
resource (Pulumi name)           promise
===============================  ==============================================================
``<host>-dirs``                  the directories dn needs on the host, with their modes (dn's
                                 data dir and LUKS images 0700, the tenant mount root, the
                                 certificate and ACME directories); created first, removed last
                                 and only when empty (never anyone's data)
``<host>-firewall-baseline``     INPUT/FORWARD policy DROP, only 80/443 public, SSH only from the
                                 admin sources, tenant bridges kept off host services; IPv4+IPv6
``<host>-nginx-base``            the nginx main config: TLS 1.2/1.3 (Mozilla intermediate),
                                 no unknown-SNI certificate, 429 for rate limits, no personal
                                 data in the access log
``<host>-timer-dn-backup-platform``  the daily platform database backup (30 days kept)
``<host>-timer-dn-health``       the health check every 60 s
``<host>-timer-dn-verify``       ``dn verify`` daily
``<host>-timer-dn-drill``        the monthly restore drill
``<host>-timer-dn-retention``    retention enforcement daily
===============================  ==============================================================

The directories are a dynamic resource of this module (:class:`HostDirectories`); the others
come from ``stacks/providers``.
"""
from __future__ import annotations

import stat as statmod
from typing import Any

import pulumi
from pulumi.dynamic import CreateResult, DiffResult, ReadResult, Resource, ResourceProvider, UpdateResult

from dn.models import HostBaseline
from dn.render.systemd import TENANT_VOLUMES

VOLUME_DIR = "/var/lib/dn/volumes"


def host_dirs(host: HostBaseline) -> list[dict[str, Any]]:
    """The directories dn needs on ``host`` (on-host paths, octal modes as strings), parents
    first."""
    dirs = [
        (host.data_dir, "0700"),
        (VOLUME_DIR, "0700"),
        (TENANT_VOLUMES, "0755"),
        (host.cert_dir, "0700"),
        (host.acme_root, "0755"),
    ]
    seen: dict[str, dict[str, Any]] = {}
    for path, mode in dirs:
        p = host.path(path)
        seen.setdefault(p, {"path": p, "mode": mode})
    return sorted(seen.values(), key=lambda d: (d["path"].count("/"), d["path"]))


def _session(ssh: dict[str, Any]):
    from dn import ssh as dnssh
    from dn.config import SSHTarget

    return dnssh.connect(SSHTarget.model_validate(ssh))


def _present(s: Any, dirs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for d in dirs:
        st = s.stat(d["path"])
        if st is not None and statmod.S_ISDIR(st.st_mode or 0):
            out.append({"path": d["path"], "mode": f"{statmod.S_IMODE(st.st_mode or 0):04o}"})
    return out


def _missing_parents(s: Any, path: str) -> list[str]:
    out, cur = [], ""
    for part in [p for p in path.split("/") if p]:
        cur += "/" + part
        if s.stat(cur) is None:
            out.append(cur)
    return out


def _ensure(s: Any, dirs: list[dict[str, Any]]) -> list[str]:
    """Create each directory with its mode; returns every directory created (parents too), so
    a delete removes exactly what dn made."""
    created: list[str] = []
    for d in dirs:
        mode = int(d["mode"], 8)
        new = _missing_parents(s, d["path"])
        s.mkdir_p(d["path"], mode)
        created += new
        st = s.stat(d["path"])
        if st is None or statmod.S_IMODE(st.st_mode or 0) != mode:
            s.run(["chmod", d["mode"], d["path"]])
    return created


def _remove(s: Any, paths: list[str]) -> list[str]:
    """rmdir each (deepest first) when empty; returns those kept because they hold something."""
    kept = []
    for p in sorted(set(paths), key=lambda p: (p.count("/"), p), reverse=True):
        if s.stat(p) is None:
            continue
        if s.listdir(p):
            kept.append(p)
            continue
        s.run(["rmdir", "--", p])
    return kept


class HostDirectoriesProvider(ResourceProvider):
    """Directories on a host over SSH (no connection held between calls)."""

    def create(self, props: dict[str, Any]) -> CreateResult:
        with _session(props["ssh"]) as s:
            created = _ensure(s, props["dirs"])
        return CreateResult(id_=f"dirs:{props['host']}", outs={**props, "created": created})

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        changed = olds.get("dirs") != news.get("dirs") or olds.get("ssh") != news.get("ssh")
        return DiffResult(changes=changed, replaces=["host"] if olds.get("host") != news.get("host") else [],
                          delete_before_replace=True)

    def update(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        wanted = {d["path"] for d in news["dirs"]}
        created = [p for p in olds.get("created", [])]
        with _session(news["ssh"]) as s:
            created += _ensure(s, news["dirs"])
            gone = [d["path"] for d in olds.get("dirs", []) if d["path"] not in wanted]
            _remove(s, gone)
        keep = [p for p in dict.fromkeys(created) if p not in gone]
        return UpdateResult(outs={**news, "created": keep})

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        with _session(props["ssh"]) as s:
            present = _present(s, props["dirs"])
        return ReadResult(id_=id_, outs={**props, "dirs": present})

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        with _session(props["ssh"]) as s:
            kept = _remove(s, [d["path"] for d in props["dirs"]] + list(props.get("created", [])))
        if kept:
            pulumi.log.warn(f"kept non-empty directories: {', '.join(kept)}")


class HostDirectories(Resource, module="dn", name="HostDirectories"):
    """The directories dn needs on a host."""

    dirs: pulumi.Output[list]

    def __init__(self, name: str, *, host: str, ssh: dict[str, Any], dirs: list[dict[str, Any]],
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(HostDirectoriesProvider(), name, {"host": host, "ssh": ssh, "dirs": dirs}, opts)


def host_baseline(inputs) -> dict[str, Any]:
    """Declare the host baseline of ``inputs`` (``stacks.programs.HostInputs``): directories
    first, then firewall, nginx main config and the host's timers; returns the resources."""
    from dn.config import ScheduleConfig
    from dn.preview import resource_name
    from stacks.providers.firewall import FirewallBaseline
    from stacks.providers.nginx import NginxBase
    from stacks.providers.timers import SystemdTimer, host_units

    host = inputs.baseline()
    data = host.model_dump(mode="json")
    dirs = HostDirectories(resource_name(host.name, "dirs"), host=host.name, ssh=inputs.ssh, dirs=host_dirs(host))
    after_dirs = pulumi.ResourceOptions(depends_on=[dirs])
    out: dict[str, Any] = {
        "dirs": dirs,
        "firewall": FirewallBaseline(resource_name(host.name, "firewall-baseline"), ssh=inputs.ssh, host=data,
                                     opts=after_dirs),
        "nginx": NginxBase(resource_name(host.name, "nginx-base"), ssh=inputs.ssh, host=data, opts=after_dirs),
    }
    schedules = ScheduleConfig.model_validate(inputs.schedules)
    for unit in host_units(host, schedules):
        out[unit] = SystemdTimer(resource_name(host.name, "timer", unit), ssh=inputs.ssh, host=data, unit=unit,
                                 schedules=dict(inputs.schedules), opts=after_dirs)
    pulumi.export("host", host.name)
    pulumi.export("public_ports", list(host.public_ports))
    pulumi.export("admin_sources", list(host.admin_sources))
    pulumi.export("timers", [f"{u}.timer" for u in host_units(host, schedules)])
    return out
