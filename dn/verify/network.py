"""Network claims: only 80/443 public, SSH only from the admin sources, tenants isolated.

The pure part reads facts — ``ss`` listeners, ``iptables-save`` rulesets, ``docker inspect`` —
into what they mean: which traffic the firewall accepts from whom, which containers sit on which
networks. The checks combine those with active probes: a TCP connect scan of the host's address
from dn's own side, and connections attempted from each tenant container's network namespace
(nsenter on the host: host tools only, whatever the image holds).
"""
from __future__ import annotations

import ipaddress
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Sequence

from dn.models import BRIDGE_PREFIX, TENANT_PORT
from dn.render.iptables import SavedTable, default_closed_findings, parse_save, rule_target
from dn.verify.core import Status, Unknown, plural
from dn.verify.probe import EXTRA_SCAN_PORTS
from dn.verify.tenants import NETWORK_PREFIX, TenantNames, registered, slug_of_network

if TYPE_CHECKING:
    from dn.verify.probe import Probe

PUBLIC_PORTS = frozenset({80, 443})
ALL_PORTS = ((1, 65535),)
RETURN_STATES = frozenset({"RELATED", "ESTABLISHED", "INVALID"})
ICMP = frozenset({"icmp", "ipv6-icmp", "icmpv6", "1", "58"})
# Interfaces whose traffic comes from inside the host (loopback, container bridges): not public.
INTERNAL_IFACES = ("lo", BRIDGE_PREFIX, "docker0", "br-")
# Options that take no value in iptables-save output.
PROBE_PARALLEL = 4  # tenants probed at once (each is one `docker exec` over the same SSH connection)
_FLAGS = frozenset({"--syn", "--rttime", "--update", "--set", "--rcheck", "--remove", "--reap"})


# --------------------------------------------------------------------------------------------
# listening sockets (ss -H -ltnu)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Listener:
    proto: str  # tcp / udp
    address: str  # "0.0.0.0", "::", "10.231.1.2", "*" ...
    port: int

    @property
    def loopback(self) -> bool:
        return is_loopback(self.address)

    def __str__(self) -> str:
        a = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.proto} {a}:{self.port}"


def is_loopback(address: str) -> bool:
    a = address.split("%", 1)[0].strip("[]")
    if a in ("*", ""):
        return False
    try:
        return ipaddress.ip_address(a).is_loopback
    except ValueError:
        return a == "localhost"


def parse_listeners(text: str) -> list[Listener]:
    """``ss -H -ltnu`` output → listeners (netid, state, queues, local address:port, peer)."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5 or parts[0] not in ("tcp", "udp"):
            continue
        local = parts[4]
        addr, _, port = local.rpartition(":")
        if not port.isdigit():
            continue
        addr = addr.split("%", 1)[0].strip("[]")
        out.append(Listener(parts[0], addr, int(port)))
    return sorted(set(out), key=lambda x: (x.proto, x.port, x.address))


# --------------------------------------------------------------------------------------------
# what the firewall accepts (iptables-save)
# --------------------------------------------------------------------------------------------
Ports = tuple[tuple[int, int], ...]  # inclusive ranges; None elsewhere means every port


def _parse_ports(text: str) -> Ports:
    out = []
    for part in text.split(","):
        a, _, b = part.partition(":")
        lo = int(a) if a else 0
        hi = int(b) if b else (65535 if ":" in part else lo)
        out.append((lo, hi))
    return tuple(out)


def _intersect(a: Ports | None, b: Ports | None) -> Ports | None:
    if a is None:
        return b
    if b is None:
        return a
    out = []
    for lo1, hi1 in a:
        for lo2, hi2 in b:
            lo, hi = max(lo1, lo2), min(hi1, hi2)
            if lo <= hi:
                out.append((lo, hi))
    return tuple(out)


def ports_text(ports: Ports | None) -> str:
    if ports is None:
        return "every port"
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports)


def _within(ports: Ports | None, allowed: Iterable[int]) -> bool:
    if ports is None:
        return False
    allowed = set(allowed)
    return all(hi - lo < 70000 and all(p in allowed for p in range(lo, hi + 1)) for lo, hi in ports)


def _covers(ports: Ports | None, port: int) -> bool:
    return ports is None or any(lo <= port <= hi for lo, hi in ports)


@dataclass(frozen=True)
class Accept:
    """Traffic the firewall lets in: new connections of ``proto`` to ``ports`` from ``sources``."""

    family: int
    table: str
    path: tuple[str, ...]  # chains walked to get here
    rule: str  # the deciding rule, as iptables-save prints it (or the chain policy)
    proto: str | None  # None: every protocol
    ports: Ports | None  # None: every port
    sources: tuple[str, ...] | None  # None: from anywhere
    kind: str = "accept"  # accept | dnat

    @property
    def public(self) -> bool:
        return self.sources is None or any(s in ("0.0.0.0/0", "::/0") for s in self.sources)

    def covers(self, proto: str, port: int) -> bool:
        return (self.proto is None or self.proto == proto) and _covers(self.ports, port)

    def describe(self) -> str:
        what = f"{self.proto or 'every protocol'} {ports_text(self.ports)}"
        src = "from anywhere" if self.public else f"from {', '.join(self.sources or ())}"
        verb = "forwarded (DNAT)" if self.kind == "dnat" else "accepted"
        return f"IPv{self.family} {what} {src} {verb} — {self.rule}"


@dataclass
class _Ctx:
    proto: str | None = None
    ports: Ports | None = None
    sources: tuple[str, ...] | None = None


@dataclass
class _Rule:
    target: str | None = None
    goto: bool = False
    internal: bool = False  # loopback, container bridges, loopback destination, return traffic
    impossible: bool = False
    proto: str | None = None
    ports: Ports | None = None
    sources: tuple[str, ...] | None = None
    extra: list[str] = field(default_factory=list)


def _internal_iface(name: str) -> bool:
    return any(name == p or name.startswith(p) for p in INTERNAL_IFACES)


def _parse_rule(tokens: Sequence[str]) -> _Rule:
    r = _Rule()
    i, neg = 0, False
    toks = list(tokens)
    while i < len(toks):
        t = toks[i]
        if t == "!":
            neg = True
            i += 1
            continue
        val = toks[i + 1] if i + 1 < len(toks) else ""
        takes_value = t.startswith("-") and t not in _FLAGS and not (val.startswith("-") and val != "-")
        if t in ("-i", "--in-interface"):
            if not neg and _internal_iface(val):
                r.internal = True
        elif t in ("-s", "--source", "--src-range"):
            if not neg:
                r.sources = tuple(val.split(","))
        elif t in ("-d", "--destination"):
            if not neg and all(is_loopback(d.split("/")[0]) for d in val.split(",")):
                r.internal = True
        elif t in ("-p", "--protocol"):
            p = val.lower()
            if not neg:
                if p in ICMP:
                    r.internal = True  # ICMP has no ports to expose; the baseline rate-limits echo
                elif p not in ("all", "0"):
                    r.proto = p
        elif t in ("--dport", "--destination-port", "--dports", "--destination-ports"):
            if not neg:
                r.ports = _parse_ports(val)
        elif t in ("--ctstate", "--state"):
            states = set(val.upper().split(","))
            if not neg and states <= RETURN_STATES:
                r.internal = True
        elif t == "--match-set":
            # -m set --match-set NAME src: a source list dn cannot see into
            direction = toks[i + 2] if i + 2 < len(toks) else ""
            if not neg and direction.startswith("src"):
                r.sources = (f"ipset:{val}",)
            i += 1  # the direction flags
        elif t in ("-j", "--jump", "-g", "--goto"):
            r.target, r.goto = val, t in ("-g", "--goto")
        elif takes_value:
            r.extra.append(f"{t} {val}")
        neg = False
        i += 2 if takes_value else 1
    return r


def _merge(ctx: _Ctx, r: _Rule) -> _Ctx | None:
    if ctx.proto and r.proto and ctx.proto != r.proto:
        return None
    proto = r.proto or ctx.proto
    ports = _intersect(ctx.ports, r.ports)
    if ports == ():
        return None
    sources = r.sources if r.sources is not None else ctx.sources
    return _Ctx(proto, ports, sources)


def _rule_text(chain: str, tokens: Sequence[str]) -> str:
    return " ".join(["-A", chain, *[t if " " not in t else f'"{t}"' for t in tokens]])


def _walk(tab: SavedTable, family: int, table: str, chain: str, ctx: _Ctx, path: tuple[str, ...],
          want: frozenset[str], out: list[Accept], kind: str) -> None:
    for tokens in tab.chain(chain):
        r = _parse_rule(tokens)
        if r.internal or r.target is None:
            continue
        merged = _merge(ctx, r)
        if merged is None:
            continue
        if r.target in want:
            out.append(Accept(family, table, path + (chain,), _rule_text(chain, tokens), merged.proto,
                              merged.ports, merged.sources, kind))
        elif r.target in tab.policies and tab.policies[r.target] is None and r.target not in path + (chain,):
            _walk(tab, family, table, r.target, merged, path + (chain,), want, out, kind)


def input_accepts(tables: dict[str, SavedTable], family: int) -> tuple[str, list[Accept]]:
    """(INPUT's effective policy, every way a new connection from outside is accepted)."""
    tab = tables.get("filter")
    if tab is None or "INPUT" not in tab.policies:
        return "ACCEPT (no filter rules loaded)", [Accept(family, "filter", ("INPUT",), "no filter table: INPUT accepts all",
                                                          None, None, None)]
    out: list[Accept] = []
    _walk(tab, family, "filter", "INPUT", _Ctx(), (), frozenset({"ACCEPT"}), out, "accept")
    policy = tab.policies.get("INPUT") or "ACCEPT"
    rules = tab.chain("INPUT")
    closing = rules and tuple(rules[-1]) in (("-j", "DROP"), ("-j", "REJECT"))
    if policy != "DROP" and not closing:
        out.append(Accept(family, "filter", ("INPUT",), f"INPUT policy {policy}", None, None, None))
    return policy, out


def forwarded(tables: dict[str, SavedTable], family: int) -> list[Accept]:
    """Ports forwarded to containers (DNAT from PREROUTING), i.e. published to the outside."""
    tab = tables.get("nat")
    if tab is None:
        return []
    out: list[Accept] = []
    _walk(tab, family, "nat", "PREROUTING", _Ctx(), (), frozenset({"DNAT", "REDIRECT"}), out, "dnat")
    return out


def within_admin(sources: Sequence[str], admin: Sequence[str]) -> bool:
    nets = []
    for a in admin:
        try:
            nets.append(ipaddress.ip_network(a, strict=False))
        except ValueError:
            continue
    for s in sources:
        try:
            net = ipaddress.ip_network(s, strict=False)
        except ValueError:
            return False  # an ipset or a range: cannot be shown to be an admin source
        if not any(net.version == n.version and net.subnet_of(n) for n in nets):
            return False
    return True


def address_in(address: str, cidrs: Sequence[str]) -> bool:
    try:
        a = ipaddress.ip_address(address)
    except ValueError:
        return False
    for c in cidrs:
        try:
            if a in ipaddress.ip_network(c, strict=False):
                return True
        except ValueError:
            continue
    return False


def _rulesets(probe: "Probe") -> dict[int, dict[str, SavedTable]]:
    out = {}
    for family in (4, 6):
        out[family] = probe.cached(("iptables", family), lambda f=family: parse_save(probe.iptables_save(f)))
    return out


def _has_global_ipv6(probe: "Probe") -> bool:
    return bool(probe.global_ipv6().strip())


# --------------------------------------------------------------------------------------------
# net.public-ports
# --------------------------------------------------------------------------------------------
def scan_ports(listeners: Iterable[Listener], ssh_port: int) -> list[int]:
    ports = set(range(1, 1025)) | set(EXTRA_SCAN_PORTS) | {ssh_port}
    ports |= {x.port for x in listeners if x.proto == "tcp" and not x.loopback}
    return sorted(ports)


def check_public_ports(probe: "Probe") -> tuple[Status, list[str]]:
    host = probe.host
    ssh_port = host.port
    fails: list[str] = []
    ev: list[str] = []
    rulesets = _rulesets(probe)
    v6_live = _has_global_ipv6(probe)
    public_accepts: list[Accept] = []
    for family in (4, 6):
        policy, accepts = input_accepts(rulesets[family], family)
        ev.append(f"firewall IPv{family}: INPUT policy {policy}")
        for a in accepts:
            if not a.public:
                continue
            public_accepts.append(a)
            ok = a.proto in ("tcp", "udp") and _within(a.ports, PUBLIC_PORTS)
            if ok:
                ev.append(f"  public: {a.describe()}")
            elif family == 6 and not v6_live:
                ev.append(f"  {a.describe()} — the host has no global IPv6 address, so nothing is public over IPv6")
            else:
                fails.append(f"firewall: {a.describe()}")
        for a in forwarded(rulesets[family], family):
            if a.public and not (a.proto in ("tcp", "udp") and _within(a.ports, PUBLIC_PORTS)):
                fails.append(f"port forwarding: {a.describe()}")
            else:
                ev.append(f"  forwarded: {a.describe()}")
    listeners = parse_listeners(probe.listeners())
    for x in listeners:
        if x.loopback:
            continue
        families = {4, 6} if x.address in ("*", "::") else {6 if ":" in x.address else 4}
        public = any(a.covers(x.proto, x.port) for a in public_accepts if a.family in families
                     and (a.family == 4 or v6_live))
        if x.port in PUBLIC_PORTS:
            ev.append(f"listening: {x} (public port)")
        elif public:
            ev.append(f"listening: {x} — the firewall lets it in from anywhere")
        else:
            ev.append(f"listening: {x} — not public (firewall)")
    ports = scan_ports(listeners, ssh_port)
    t = time.monotonic()
    accepted = probe.tcp_scan(ports)
    took = time.monotonic() - t
    seen = probe.seen_from() or next(iter(accepted.values()), None)
    ev.append(f"active scan of {host.address} from {seen or 'this machine'}: {len(ports)} TCP ports "
              f"(1-1024, {len(EXTRA_SCAN_PORTS)} common service ports, every listening port) in {took:.1f}s; "
              f"accepted: {', '.join(str(p) for p in sorted(accepted)) or 'none'}")
    accepts_here = input_accepts(rulesets[4], 4)[1] if ":" not in host.address else input_accepts(rulesets[6], 6)[1]
    for port in sorted(accepted):
        if port in PUBLIC_PORTS:
            continue
        covering = [a for a in accepts_here if a.covers("tcp", port)]
        if any(a.public for a in covering):
            fails.append(f"active scan: {host.address}:{port}/tcp accepted a connection from {seen}")
        elif seen and (mine := [a for a in covering if address_in(seen, list(a.sources or ()))]):
            what = "SSH" if port == ssh_port else "a service"
            ev.append(f"  {port}/tcp ({what}) answered this prober, which the firewall lets in from "
                      f"{', '.join(s for a in mine for s in a.sources or ())} only — not public"
                      + (" (net.admin-ssh judges who else may reach SSH)" if port == ssh_port else ""))
        else:
            fails.append(f"active scan: {host.address}:{port}/tcp accepted a connection from {seen}, although "
                         "no firewall rule read here accepts it")
    return (Status.FAIL if fails else Status.PASS), fails + ev


# --------------------------------------------------------------------------------------------
# net.admin-ssh
# --------------------------------------------------------------------------------------------
def check_admin_ssh(probe: "Probe") -> tuple[Status, list[str]]:
    host = probe.host
    admin = list(host.admin_sources)
    fails: list[str] = []
    ev = [f"configured admin sources: {', '.join(admin) or 'none'}; SSH port {host.port}"]
    if not admin:
        fails.append("no admin sources are configured (hosts.<name>.admin_sources)")
    rulesets = _rulesets(probe)
    v6_live = _has_global_ipv6(probe)
    allowed_from: list[str] = []
    for family in (4, 6):
        _, accepts = input_accepts(rulesets[family], family)
        for a in accepts:
            if not a.covers("tcp", host.port):
                continue
            if not a.public and within_admin(a.sources or (), admin):
                allowed_from += list(a.sources or ())
                ev.append(f"admin: {a.describe()}")
            elif family == 6 and not v6_live:
                ev.append(f"{a.describe()} — no global IPv6 address on the host")
            else:
                who = "anywhere" if a.public else ", ".join(a.sources or ())
                fails.append(f"SSH reachable from {who}, which is not an admin source: {a.describe()}")
    ev.append(f"SSH accepted only from: {', '.join(dict.fromkeys(allowed_from)) or 'nobody (closed)'}")
    return (Status.FAIL if fails else Status.PASS), fails + ev


# --------------------------------------------------------------------------------------------
# net.tenant-isolation
# --------------------------------------------------------------------------------------------
def _name(c: dict) -> str:
    return (c.get("Name") or "").lstrip("/")


def published_ports(c: dict) -> list[str]:
    """Host bindings of a container (``HostConfig.PortBindings`` and live ``NetworkSettings.Ports``)."""
    out = []
    for src in ((c.get("HostConfig") or {}).get("PortBindings") or {},
                (c.get("NetworkSettings") or {}).get("Ports") or {}):
        for cport, binds in src.items():
            for b in binds or []:
                out.append(f"{b.get('HostIp') or '0.0.0.0'}:{b.get('HostPort') or '?'}->{cport}")
    return sorted(set(out))


def container_networks(c: dict) -> dict[str, str]:
    """network name -> IPv4 address of a container."""
    nets = (c.get("NetworkSettings") or {}).get("Networks") or {}
    return {n: (v or {}).get("IPAddress") or "" for n, v in nets.items()}


def running(c: dict) -> bool:
    return bool((c.get("State") or {}).get("Running"))


@dataclass
class TenantView:
    names: TenantNames
    registered: bool
    network: dict | None
    containers: list[dict]


def tenant_views(tenants: list[TenantNames], networks: list[dict], containers: list[dict]) -> list[TenantView]:
    """Registered tenants plus any tenant network found on the host that is not registered."""
    by_net = {n.get("Name"): n for n in networks}
    views = []
    seen = set()
    for t in tenants:
        seen.add(t.slug)
        mine = [c for c in containers if _name(c) in t.containers or t.network in container_networks(c)]
        views.append(TenantView(t, True, by_net.get(t.network), mine))
    for name, net in sorted(by_net.items()):
        slug = slug_of_network(name or "")
        if slug and slug not in seen:
            t = TenantNames(slug, "unregistered")
            mine = [c for c in containers if _name(c) in t.containers or name in container_networks(c)]
            views.append(TenantView(t, False, net, mine))
    return views


def structure_findings(v: TenantView, filt: SavedTable | None) -> tuple[list[str], list[str]]:
    """(failures, evidence) of one tenant's network, containers and firewall chains."""
    fails, ev = [], []
    t = v.names
    label = t.slug if v.registered else f"{t.slug} (not in the registry)"
    if v.network is None:
        if v.containers:
            fails.append(f"{label}: containers {', '.join(_name(c) for c in v.containers)} run but network "
                         f"{t.network} does not exist")
        else:
            ev.append(f"{label}: not deployed on this host (no network, no container)")
        return fails, ev
    opts = v.network.get("Options") or {}
    icc = opts.get("com.docker.network.bridge.enable_icc", "true")
    bridge = opts.get("com.docker.network.bridge.name", "")
    subnets = [c.get("Subnet") for c in ((v.network.get("IPAM") or {}).get("Config") or [])]
    ev.append(f"{label}: network {t.network} driver {v.network.get('Driver')}, bridge {bridge or '?'}, "
              f"subnet {', '.join(s for s in subnets if s) or '?'}, enable_icc={icc}")
    if v.network.get("Driver") != "bridge":
        fails.append(f"{label}: network {t.network} uses driver {v.network.get('Driver')}, not an isolated bridge")
    if str(icc).lower() != "false":
        fails.append(f"{label}: network {t.network} has inter-container communication enabled (enable_icc={icc})")
    if bridge != t.bridge:
        fails.append(f"{label}: network {t.network} uses bridge {bridge or '(docker default)'}, not {t.bridge}: "
                     "the firewall's tenant rules do not apply to it")
    for c in v.containers:
        nets = container_networks(c)
        mode = (c.get("HostConfig") or {}).get("NetworkMode")
        others = sorted(n for n in nets if n != t.network)
        if _name(c) not in t.containers:
            fails.append(f"{label}: container {_name(c)} (not this tenant's) is attached to {t.network}")
        elif mode == "host":
            fails.append(f"{label}: container {_name(c)} runs in the host's network namespace")
        elif others:
            fails.append(f"{label}: container {_name(c)} is also attached to {', '.join(others)}")
        elif t.network not in nets:
            fails.append(f"{label}: container {_name(c)} is not attached to {t.network}")
        else:
            ev.append(f"{label}: container {_name(c)} attached only to {t.network} "
                      f"({nets[t.network] or 'no address'}), {'running' if running(c) else 'stopped'}")
    if filt is not None and v.registered:
        fwd_hook = ("-i", t.bridge, "-g", t.chain_forward)
        in_hook = ("-i", t.bridge, "-j", t.chain_input)
        missing = []
        if filt.count("DN-TENANTS-FWD", fwd_hook) != 1:
            missing.append(f"DN-TENANTS-FWD jump to {t.chain_forward}")
        if filt.count("DN-TENANTS-IN", in_hook) != 1:
            missing.append(f"DN-TENANTS-IN jump to {t.chain_input}")
        fwd = filt.chain(t.chain_forward)
        if not any("-o" in r and f"{BRIDGE_PREFIX}+" in r and r[-1] == "DROP" for r in fwd):
            missing.append(f"{t.chain_forward} dropping traffic to other tenants")
        inp = filt.chain(t.chain_input)
        if not inp or inp[-1][-1] != "DROP":
            missing.append(f"{t.chain_input} ending in DROP")
        if missing:
            fails.append(f"{label}: firewall isolation incomplete: {'; '.join(missing)}")
        else:
            ev.append(f"{label}: firewall chains {t.chain_forward}/{t.chain_input} hooked for bridge {t.bridge}")
    return fails, ev


def probe_targets(src: dict, me: TenantView, views: list[TenantView], host_ips: list[str],
                  host_ports: list[int]) -> list[str]:
    """address:port targets container ``src`` of tenant ``me`` must not reach: every other
    running sGTM container (its own tenant's too: ICC is off), and the host's services on the
    tenant's gateway and on the host's own address."""
    out = []
    for v in views:
        for c in v.containers:
            if c is src or not running(c):
                continue
            for ip in container_networks(c).values():
                if ip and _ip_ok(ip):
                    out.append(f"{ip}:{TENANT_PORT}")
    gateways = []
    if me.network is not None:
        for cfg in (me.network.get("IPAM") or {}).get("Config") or []:
            if cfg.get("Gateway") and _ip_ok(cfg["Gateway"]):
                gateways.append(cfg["Gateway"])
    for ip in dict.fromkeys(gateways + [h for h in host_ips if _ip_ok(h)]):
        for p in host_ports:
            out.append(f"{ip}:{p}")
    return list(dict.fromkeys(out))


def _ip_ok(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).version == 4
    except ValueError:
        return False


def host_service_ports(listeners: list[Listener], allowed: Sequence[str]) -> list[int]:
    """TCP ports the host serves that tenant containers must not reach: every non-loopback TCP
    listener except 443 (nginx, which tenants may use like anyone) and the declared
    ``tenant_host_services``."""
    ok = {443} | {int(s.split("/")[1]) for s in allowed if s.startswith("tcp/")}
    return sorted({x.port for x in listeners if x.proto == "tcp" and not x.loopback and x.port not in ok})


def check_tenant_isolation(probe: "Probe") -> tuple[Status, list[str]]:
    fails: list[str] = []
    ev: list[str] = []
    tenants = registered(probe.tenants())
    containers = probe.containers()
    networks = probe.networks()
    try:
        filt = _rulesets(probe)[4].get("filter")
    except Unknown as e:
        filt = None
        ev.append(f"firewall not read: {e}")
    views = tenant_views(tenants, networks, containers)
    ev.insert(0, f"{plural(len(tenants), 'registered tenant')} on {probe.host_name}; {plural(len(views), 'tenant')} "
                 f"found (registry and tenant networks); {plural(len(containers), 'container')} on the host")
    for v in views:
        f, e = structure_findings(v, filt)
        if v.registered:
            fails += f
        else:
            # Not a tenant dn knows: drift for `dn refresh` to report; its containers are still
            # probe targets below, so a path from a tenant to them still fails this check.
            e = [f"{line} (unregistered: not judged here)" for line in f] + e
        ev += e
    publishing = [(c, published_ports(c)) for c in containers]
    for c, binds in publishing:
        if binds:
            fails.append(f"container {_name(c)} publishes ports on the host: {', '.join(binds)}")
    if not any(b for _, b in publishing):
        ev.append(f"no container publishes a port ({len(containers)} inspected)")
    # active: from one running container of each tenant, towards everything it must not reach
    try:
        baseline = probe.baseline
        allowed = list(baseline.tenant_host_services)
    except Exception:
        allowed = []
    host_ports = host_service_ports(parse_listeners(probe.listeners()), allowed)
    jobs = []
    for v in views:
        own = [c for c in v.containers if running(c) and _name(c) in v.names.containers]
        if not own or not v.registered:
            continue
        src = sorted(own, key=lambda c: v.names.containers.index(_name(c)))[0]  # the tagging server first
        targets = probe_targets(src, v, views, [probe.host.address], host_ports)
        pid = (src.get("State") or {}).get("Pid")
        if targets and pid:
            jobs.append((_name(src), int(pid), targets))
    # Each probe waits out its filtered targets; the tenants' probes run side by side.
    with ThreadPoolExecutor(max_workers=PROBE_PARALLEL) as pool:
        outcomes = list(pool.map(lambda job: probe.container_connect(*job), jobs))
    probed = len(jobs)
    for (src, _, targets), result in zip(jobs, outcomes):
        reached = [t for t, ok in result.items() if ok]
        for t in reached:
            fails.append(f"active probe: {src} reached {t}{_describe_target(t, views, probe)}")
        ev.append(f"active probe from {src}'s network namespace: {len(targets)} targets (other sGTM containers :{TENANT_PORT}, "
                  f"host ports {', '.join(map(str, host_ports)) or 'none'}), {len(targets) - len(reached)} "
                  "refused or filtered")
    if not probed:
        ev.append("active probe: no running tenant container to probe from")
    return (Status.FAIL if fails else Status.PASS), fails + ev


# --------------------------------------------------------------------------------------------
# net.tenant-default-closed
# --------------------------------------------------------------------------------------------
def check_tenant_default_closed(probe: "Probe") -> tuple[Status, list[str]]:
    rs = _rulesets(probe)
    fails, ev = default_closed_findings(rs[4].get("filter", SavedTable()), rs[6].get("filter", SavedTable()))
    return (Status.FAIL if fails else Status.PASS), fails + ev


def _describe_target(target: str, views: list[TenantView], probe: "Probe") -> str:
    ip = target.rsplit(":", 1)[0]
    for v in views:
        for c in v.containers:
            if ip in container_networks(c).values():
                return f" ({_name(c)} of tenant {v.names.slug})"
    if ip == probe.host.address:
        return " (a host service)"
    return " (a host service on the tenant gateway)"


__all__ = ["check_public_ports", "check_admin_ssh", "check_tenant_isolation", "check_tenant_default_closed",
           "default_closed_findings", "parse_listeners", "input_accepts",
           "forwarded", "NETWORK_PREFIX"]
