"""nginx claims: per-IP and per-tenant rate limits, TLS 1.2/1.3 only, HSTS, no drift.

The configuration is read as nginx itself loads it (``nginx -T`` on the host: every included file,
in order) and parsed with dn.render.nginx.parse_config. The TLS and HSTS claims are also checked
on the wire: TLS handshakes at a fixed protocol version and HTTPS requests to every tenant vhost,
with the vhost's own name as SNI and Host.
"""
from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

from dn.errors import DnError
from dn.render.nginx import VHOST_DIR, Directive, parse_config, vhost_path
from dn.verify.core import Status, Unknown, plural
from dn.verify.tenants import registered

if TYPE_CHECKING:
    from dn.verify.probe import Probe

TLS_ALLOWED = ("TLSv1.2", "TLSv1.3")
TLS_REFUSED = ("TLSv1.1",)
HSTS_MIN = 15552000  # 180 days: the minimum for HSTS preloading and what "HSTS" promises here
IP_KEYS = ("$binary_remote_addr", "$remote_addr")
PROXY = ("proxy_pass", "fastcgi_pass", "uwsgi_pass", "scgi_pass", "grpc_pass")
_FILE_MARK = re.compile(r"^# configuration file (.+):\s*$", re.M)


# --------------------------------------------------------------------------------------------
# reading the configuration (pure)
# --------------------------------------------------------------------------------------------
def split_dump(text: str) -> dict[str, str]:
    """``nginx -T`` output → {file path: content}, in the order nginx read them."""
    marks = list(_FILE_MARK.finditer(text))
    out = {}
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        body = text[m.end():end]
        out[m.group(1)] = body[1:] if body.startswith("\n") else body
    return out


@dataclass
class Server:
    file: str
    block: Directive

    @property
    def names(self) -> list[str]:
        return [a for d in self.block.find("server_name") for a in d.args]

    @property
    def tls(self) -> bool:
        return any("ssl" in d.args or any(a.endswith(":443") or a == "443" for a in d.args)
                   for d in self.block.find("listen"))

    @property
    def default(self) -> bool:
        return self.names in ([], ["_"]) or any("default_server" in d.args for d in self.block.find("listen"))

    def label(self) -> str:
        return f"{posixpath.basename(self.file)}: {' '.join(self.names[:3]) or '(no name)'}" \
               f"{' (TLS)' if self.tls else ''}"

    def sni(self) -> str | None:
        for n in self.names:
            if n and n != "_" and not n.startswith("~"):
                return n.replace("*.", "dn-verify.", 1) if n.startswith("*.") else n
        return None


@dataclass
class Config:
    files: dict[str, tuple[Directive, ...]]
    http: list[Directive] = field(default_factory=list)  # http-level directives, every file
    servers: list[Server] = field(default_factory=list)

    def zones(self, kind: str) -> dict[str, str]:
        """zone name -> key, of ``limit_req_zone`` or ``limit_conn_zone``."""
        out = {}
        for d in self.http:
            if d.name == kind and d.args:
                for a in d.args[1:]:
                    if a.startswith("zone="):
                        out[a[5:].split(":", 1)[0]] = d.args[0]
        return out


def load(text: str) -> Config:
    """Parse every file of an ``nginx -T`` dump. The first file is the main configuration; the
    top level of every other file counts as http level (dn includes its zone and vhost files
    inside ``http {}``)."""
    files = {path: parse_config(body) for path, body in split_dump(text).items()}
    if not files:
        raise Unknown("nginx -T printed no configuration")
    cfg = Config(files)
    main = next(iter(files))
    for path, top in files.items():
        if path == main:
            for d in top:
                if d.name == "http":
                    for x in d.block or ():
                        (cfg.servers.append(Server(path, x)) if x.name == "server" else cfg.http.append(x))
        else:
            for x in top:
                (cfg.servers.append(Server(path, x)) if x.name == "server" else cfg.http.append(x))
    return cfg


def _limits(directives, inherited: tuple[list, list]) -> tuple[list, list]:
    req = [d for d in directives if d.name == "limit_req"]
    conn = [d for d in directives if d.name == "limit_conn"]
    # nginx inherits limit_req / limit_conn only when the level defines none of its own
    return (req or inherited[0]), (conn or inherited[1])


def _proxying_locations(block, inherited, path=""):
    """(location path, effective limit_req, effective limit_conn) of every location that proxies."""
    out = []
    for d in block or ():
        if d.name in ("location", "if"):
            eff = _limits(d.block or (), inherited)
            where = f"{path} location {' '.join(d.args)}".strip() if d.name == "location" else f"{path} if".strip()
            if any(x.name in PROXY for x in d.block or ()):
                out.append((where, eff[0], eff[1]))
            out += _proxying_locations(d.block, eff, where)
    return out


def rate_limit_findings(cfg: Config) -> tuple[list[str], list[str], dict[str, set[str]]]:
    """(failures, evidence, tenant zone -> files using it) over every proxying server."""
    req_zones = cfg.zones("limit_req_zone")
    conn_zones = cfg.zones("limit_conn_zone")
    http_eff = _limits(cfg.http, ([], []))
    fails, ev = [], []
    tenant_zone_users: dict[str, set[str]] = {}
    for s in cfg.servers:
        eff = _limits(s.block.block or (), http_eff)
        locs = _proxying_locations(s.block.block, eff)
        if not locs:
            continue
        for where, req, conn in locs:
            zones = [a[5:] for d in req for a in d.args if a.startswith("zone=")]
            per_ip = [z for z in zones if req_zones.get(z) in IP_KEYS]
            per_tenant = [z for z in zones if z in req_zones and "$" not in req_zones[z]]
            conn_ip = [d.args[0] for d in conn if d.args and conn_zones.get(d.args[0]) in IP_KEYS]
            for z in per_tenant:
                tenant_zone_users.setdefault(z, set()).add(s.file)
            missing = []
            if not per_ip:
                missing.append("a per-IP limit_req (zone keyed on $binary_remote_addr)")
            if not per_tenant:
                missing.append("a per-tenant limit_req (zone keyed on a per-tenant constant)")
            if not conn_ip:
                missing.append("a per-IP limit_conn")
            undefined = [z for z in zones if z not in req_zones]
            if undefined:
                missing.append(f"definitions of zones {', '.join(undefined)}")
            if missing:
                fails.append(f"{s.label()} {where}: proxies without {'; '.join(missing)}")
            else:
                ev.append(f"{s.label()} {where}: per-IP {', '.join(per_ip)}; per-tenant {', '.join(per_tenant)}; "
                          f"connections {', '.join(conn_ip)}")
    for z, users in sorted(tenant_zone_users.items()):
        if len(users) > 1:
            fails.append(f"per-tenant zone {z} is shared by {len(users)} vhost files "
                         f"({', '.join(sorted(posixpath.basename(u) for u in users))}): not per tenant")
    return fails, ev, tenant_zone_users


# --------------------------------------------------------------------------------------------
# nginx.rate-limits
# --------------------------------------------------------------------------------------------
def _config(probe: "Probe") -> Config:
    return probe.cached("nginx config", lambda: load(probe.nginx_dump()))


def _vhost_servers(cfg: Config, probe: "Probe") -> list[Server]:
    """Every non-default server block: the tenants' vhosts."""
    return [s for s in cfg.servers if not s.default]


def check_rate_limits(probe: "Probe") -> tuple[Status, list[str]]:
    cfg = _config(probe)
    fails, ev, _ = rate_limit_findings(cfg)
    base = probe.baseline
    files = set(cfg.files)
    for t in registered(probe.tenants()):
        path = base.path(t.vhost_file)
        if t.status != "active":
            continue
        if path not in files:
            ev.append(f"tenant {t.slug}: no vhost loaded by nginx ({path}): not served, nothing to limit")
        elif not any(s.file == path for s in cfg.servers
                     if _proxying_locations(s.block.block, _limits(s.block.block or (), ([], [])))):
            ev.append(f"tenant {t.slug}: its vhost proxies nothing (not served)")
    proxying = sum(1 for s in cfg.servers if _proxying_locations(s.block.block, ([], [])))
    ev.insert(0, f"{plural(len(cfg.files), 'configuration file')} loaded; {plural(proxying, 'server')} proxy to tenant "
                 "containers")
    if not proxying and not fails:
        ev.append("no server proxies anywhere: nothing to rate-limit")
    return (Status.FAIL if fails else Status.PASS), fails + ev


# --------------------------------------------------------------------------------------------
# nginx.tls
# --------------------------------------------------------------------------------------------
def tls_config_findings(cfg: Config) -> tuple[list[str], list[str]]:
    fails, ev = [], []
    want = set(TLS_ALLOWED)
    http_level = [d for d in cfg.http if d.name == "ssl_protocols"]
    for d in http_level:
        if set(d.args) != want:
            fails.append(f"http: ssl_protocols {' '.join(d.args)} (must be exactly {' '.join(TLS_ALLOWED)})")
        else:
            ev.append(f"http: ssl_protocols {' '.join(d.args)}")
    for s in cfg.servers:
        own = s.block.find("ssl_protocols")
        for d in own:
            if set(d.args) != want:
                fails.append(f"{s.label()}: ssl_protocols {' '.join(d.args)} (must be exactly {' '.join(TLS_ALLOWED)})")
        if s.tls and not own and not http_level:
            fails.append(f"{s.label()}: no ssl_protocols (nginx's default enables TLSv1 and TLSv1.1)")
    return fails, ev


def check_tls(probe: "Probe") -> tuple[Status, list[str]]:
    cfg = _config(probe)
    fails, ev = tls_config_findings(cfg)
    names = sorted({s.sni() for s in _vhost_servers(cfg, probe) if s.tls and s.sni()})
    if not names:
        ev.append("no TLS vhost to handshake with")
        return (Status.FAIL if fails else Status.PASS), fails + ev
    cannot: list[str] = []
    for sni in names:
        seen = []
        for version in TLS_REFUSED + TLS_ALLOWED:
            h = probe.tls_handshake(sni, version)
            if h.unreachable:
                raise Unknown(f"{sni}: {h.error}", fails + ev)
            if h.client_cannot:
                cannot.append(f"{sni} {version}: this machine's TLS library cannot offer it ({h.error})")
                continue
            if version in TLS_REFUSED and h.accepted:
                fails.append(f"{sni}: a {version} handshake was ACCEPTED (negotiated {h.negotiated})")
            elif version in TLS_ALLOWED and not h.accepted:
                fails.append(f"{sni}: a {version} handshake was refused ({h.error})")
            seen.append(f"{version} {'accepted' if h.accepted else 'refused'}")
            if h.accepted and h.not_after is not None:
                left = h.not_after - probe.now
                if left < timedelta(0):
                    fails.append(f"{sni}: the certificate expired on {h.not_after:%Y-%m-%d}")
                elif version == "TLSv1.3":
                    seen.append(f"certificate valid until {h.not_after:%Y-%m-%d} ({left.days} days)")
        ev.append(f"handshake {sni}@{probe.host.address}:443: {', '.join(seen)}")
    if cannot and not fails:
        raise Unknown("the refusal of old TLS versions could not be tested from this machine", cannot + ev)
    return (Status.FAIL if fails else Status.PASS), fails + cannot + ev


# --------------------------------------------------------------------------------------------
# nginx.hsts
# --------------------------------------------------------------------------------------------
def hsts_max_age(value: str) -> int | None:
    m = re.search(r"max-age\s*=\s*\"?(\d+)", value, re.I)
    return int(m.group(1)) if m else None


def request_paths(s: Server) -> list[str]:
    """The root and every literal location path of a server (regex and named locations skipped)."""
    paths = ["/"]
    for d in s.block.find("location"):
        args = list(d.args)
        if args and args[0] in ("=", "^~"):
            args = args[1:]
        if args and args[0].startswith("/") and args[0] not in paths:
            paths.append(args[0])
    return paths


def check_hsts(probe: "Probe") -> tuple[Status, list[str]]:
    cfg = _config(probe)
    fails, ev = [], []
    servers = [s for s in _vhost_servers(cfg, probe) if s.tls and s.sni()]
    if not servers:
        ev.append("no TLS vhost: nothing is served over HTTPS")
        return Status.PASS, ev
    unknown = []
    for s in servers:
        sni = s.sni()
        for path in request_paths(s):
            try:
                reply = probe.https_get(sni, path)
            except Unknown as e:
                unknown.append(str(e))
                continue
            values = reply.header("strict-transport-security")
            ages = [hsts_max_age(v) for v in values]
            if not values:
                fails.append(f"https://{sni}{path}: {reply.status} without a Strict-Transport-Security header")
            elif any(a is None or a < HSTS_MIN for a in ages):
                fails.append(f"https://{sni}{path}: {reply.status} Strict-Transport-Security \"{values[0]}\" "
                             f"(max-age must be at least {HSTS_MIN} s = 180 days)")
            else:
                ev.append(f"https://{sni}{path}: {reply.status} Strict-Transport-Security \"{values[0]}\"")
    if unknown and not fails:
        raise Unknown(f"{len(unknown)} request(s) got no response: {unknown[0]}", unknown + ev)
    return (Status.FAIL if fails else Status.PASS), fails + unknown + ev


# --------------------------------------------------------------------------------------------
# nginx.no-drift
# --------------------------------------------------------------------------------------------
def reload_findings(probe: "Probe", cfg: Config) -> tuple[list[str], list[str]]:
    """Whether nginx runs the files on disk: no configuration file changed after its newest
    workers started (a reload starts new workers)."""
    from dn.render.nginx import pid_path

    pid_file = pid_path(probe.baseline)
    try:
        pid = int(probe.session().read_file(pid_file).split()[0])
    except (DnError, ValueError, IndexError):
        return [f"nginx is not running (no readable pid file {pid_file})"], []
    out = probe.run(["sh", "-c", 'date +%s; ps -o etimes= --ppid "$1"', "sh", str(pid)]).text.split()
    ages = [int(x) for x in out[1:] if x.isdigit()]
    if not out or not out[0].isdigit() or not ages:
        return [f"nginx master {pid} has no worker processes"], []
    started = int(out[0]) - min(ages)
    fails, ev = [], [f"nginx master {pid}: newest workers started {min(ages)} s ago"]
    for path in cfg.files:
        st = probe.session().stat(path)
        if st is not None and st.st_mtime and st.st_mtime > started + 1:
            fails.append(f"{path} changed after nginx last (re)loaded: nginx runs an older configuration")
    return fails, ev


def check_no_drift(probe: "Probe") -> tuple[Status, list[str]]:
    from dn.host import nginx as hn

    cfg = _config(probe)
    fails, ev = reload_findings(probe, cfg)
    try:
        specs = probe.tenant_specs()
    except Unknown as e:
        raise Unknown(str(e), fails + ev) from None
    base = probe.baseline
    session = probe.session()
    # A tenant being deleted loses its vhost as its stack is destroyed: not drift.
    deleting = {r["slug"] for r in probe.tenants() if r["status"] == "deleting"}
    for slug in sorted(deleting):
        ev.append(f"vhost-{slug}: tenant being deleted (GDPR request), not compared")
    units = [hn.base_unit(base)] + [hn.vhost_unit(base, t) for t in specs if t.slug not in deleting]
    for unit in units:
        plan = hn.plan(unit, hn.read(session, base, unit), where=probe.host_name)
        if plan.empty:
            ev.append(f"{unit.name}: {len(unit.files)} file(s) as dn renders them, loaded")
        else:
            fails += [f"{unit.name}: {c}" for c in plan.changes]
    registered_slugs = {t.slug for t in specs}  # deleting ones included: their file may remain
    for slug in hn.served_vhosts(session, base):
        if slug not in registered_slugs:
            fails.append(f"vhost {slug}.conf is on the host but no tenant {slug!r} is registered for {probe.host_name}")
    vhost_dir = base.path(VHOST_DIR) + "/"
    expected = {p for u in units for p in u.files} | {vhost_path(base, t) for t in specs}
    for path in cfg.files:
        if path not in expected and path.startswith(vhost_dir):
            fails.append(f"{path}: loaded by nginx but not rendered by dn")
    ev.insert(0, f"{plural(len(specs), 'registered tenant')}: compared the base config and every vhost")
    return (Status.FAIL if fails else Status.PASS), fails + ev
