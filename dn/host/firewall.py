"""The host firewall, applied over SSH: the host baseline (IPv4 and IPv6) and each tenant's chains.

dn rewrites only its own chains (``dn.render.iptables``): one ``iptables-restore -w --noflush``
(``ip6tables-restore``) per address family, so Docker's chains and anyone else's rules stay as
they are. An apply (``apply``, after ``read`` and the pure ``plan``):

1. refusals, decided by the plan before anything changes: a referenced chain that exists neither
   in the file nor on the host (``iptables-nft-restore --test`` does not notice one), and any
   baseline that would no longer accept a *new* SSH connection from the address dn is connected
   from (``$SSH_CONNECTION`` on the host; the rendered rules are evaluated for that packet);
2. ``save``: ``iptables-save``/``ip6tables-save``, the snapshot a failure goes back to (if the
   rules changed since the plan was made, nothing is done: plan again);
3. ``arm``: an *undo* file per family is written to the host and a detached timer there loads it
   after ``deadman`` seconds unless dn disarms it: a connection lost in the middle of an apply
   still ends with the previous rules. The undo takes back only what this apply changes (its
   own chains, its hooks, its tails, the policies it sets; ``dn.render.iptables.undo_text``) and
   only if all of it is still exactly what this apply left: the file is a compare-and-swap that
   ``iptables-restore`` refuses as a whole otherwise. The timer runs outside the host lock, so
   another apply may have run meanwhile; its chains, and anything built on this apply's, stay;
4. ``validate``: ``iptables-restore -w --test --noflush`` of each family's file;
5. ``apply``: the real restore of each family;
6. ``check``: the rules read back equal the rendered ones (hooks exactly once), and when the
   baseline changed, a fresh SSH connection still gets in;
7. on failure in 4-6 what this apply changed goes back to the snapshot (the same scoped undo,
   unconditional: dn holds the lock and has just read the rules) and is compared with it;
   Docker's chains and other tenants' rules are left as they are now;
8. ``disarm``, and disarm earlier timers of the same chains (a previous apply of them that lost
   its connection): a rerun that finds the rules as it wants them, or puts them so, is not undone
   by the first run's timer. An empty plan does that too.

Callers hold the host's lock so that two applies never interleave (the shared dispatch chains
``DN-TENANTS-FWD``/``DN-TENANTS-IN`` are created by whichever apply finds them missing).
"""
from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dn.errors import DnError, OperationFailed, PolicyViolation
from dn.host.plan import ApplyRefused, Change, Plan, Progress, digest, no_progress
from dn.models import HostBaseline
from dn.render.iptables import (
    TABLE,
    TENANTS_FWD,
    TENANTS_IN,
    Ruleset,
    SavedTable,
    apply_restore,
    combined_restore_text,
    default_closed_findings,
    format_rule,
    missing_chains,
    parse_save,
    render_baseline,
    render_tenant_rules,
    undo_problems,
    undo_text,
)

if TYPE_CHECKING:
    from dn.models import TenantSpec
    from dn.ssh import Session

FAMILIES = (4, 6)
SAVE = {4: "iptables-save", 6: "ip6tables-save"}
RESTORE = {4: "iptables-restore", 6: "ip6tables-restore"}
# The host undoes the apply by itself this long after arming, unless disarmed. 30 s was less than
# a baseline apply takes on a slow host (a TCG-emulated VM: the timer undid the rules mid-apply).
DEADMAN_S = 180.0
# The host side of the dead-man switch: sleep, then load each undo file that still exists (a
# compare-and-swap: iptables-restore refuses it whole if what the apply left has changed), and
# say which it did in the host's log. A constant script; the delay and the paths arrive as
# positional arguments.
DEADMAN_SCRIPT = (
    'exec </dev/null >/dev/null 2>&1; sleep "$1"; '
    'for f in "$2" "$3"; do [ -e "$f" ] || continue; '
    'case "$f" in *.v6) r=ip6tables-restore;; *) r=iptables-restore;; esac; '
    'if "$r" -w --noflush < "$f"; then m=undone; else m="not undone: changed since"; fi; rm -f "$f"; '
    'logger -t dn-firewall-deadman "$f: $m" || true; done'
)


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class Admin:
    """How dn reaches the host right now: its source address, the host address and port it
    connected to, and the host interface that traffic arrives on (None if unknown)."""

    source: str
    address: str
    port: int
    interface: str | None = None

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.source).version


@dataclass(frozen=True)
class FirewallState:
    """``iptables-save`` text per family, parsed, and the admin connection."""

    saved: dict[int, str]
    tables: dict[int, dict[str, SavedTable]]
    admin: Admin | None = None

    def filter_text(self, family: int) -> str:
        return filter_section(self.saved[family])

    def basis(self) -> str:
        """A digest of every family's filter table (rules and policies, counters ignored)."""
        return digest({f"ipv{f}": normalized(self.saved[f]).encode() for f in self.saved})


def filter_section(save_text: str) -> str:
    """The ``*filter`` ... ``COMMIT`` part of iptables-save output (comments dropped), ready for
    ``iptables-restore`` (an empty filter table if there is none)."""
    out, inside = [], False
    for line in save_text.splitlines():
        s = line.strip()
        if s == f"*{TABLE}":
            inside = True
        if inside and s and not s.startswith("#"):
            out.append(s)
        if inside and s == "COMMIT":
            break
    return "\n".join(out) + "\n" if out else f"*{TABLE}\nCOMMIT\n"


def normalized(save_text: str, table: str = TABLE) -> str:
    """One table of iptables-save output without comments and counters, for comparisons."""
    t = parse_save(save_text).get(table, SavedTable())
    lines = [f":{c} {p or '-'}" for c, p in sorted(t.policies.items())]
    for chain in sorted(t.rules):
        lines += [format_rule("-A", chain, r) for r in t.rules[chain]]
    return "\n".join(lines) + "\n"


def parse_ssh_connection(value: str) -> tuple[str, str, int] | None:
    """(client address, server address, server port) from ``$SSH_CONNECTION``."""
    parts = value.split()
    if len(parts) != 4 or not parts[3].isdigit():
        return None
    try:
        client = str(ipaddress.ip_address(parts[0].split("%")[0]))
        server = str(ipaddress.ip_address(parts[2].split("%")[0]))
    except ValueError:
        return None
    if ipaddress.ip_address(client).version == 6 and ipaddress.ip_address(client).ipv4_mapped:
        client = str(ipaddress.ip_address(client).ipv4_mapped)
        server = str(ipaddress.ip_address(server).ipv4_mapped or server)
    return client, server, int(parts[3])


def parse_route_dev(text: str) -> str | None:
    """The ``dev`` of ``ip -o route get ADDR`` output."""
    toks = text.split()
    for i, tok in enumerate(toks[:-1]):
        if tok == "dev":
            return toks[i + 1]
    return None


def read(session: "Session", families: Sequence[int] = FAMILIES) -> FirewallState:
    """Both families' rules and the admin connection as the host sees it."""
    saved = {f: session.run([SAVE[f]]).text for f in families}
    admin = None
    r = session.run(["printenv", "SSH_CONNECTION"], check=False)
    conn = parse_ssh_connection(r.text.strip()) if r.rc == 0 else None
    if conn:
        route = session.run(["ip", "-o", "route", "get", conn[0]], check=False)
        admin = Admin(conn[0], conn[1], conn[2], parse_route_dev(route.text) if route.rc == 0 else None)
    return FirewallState(saved, {f: parse_save(t) for f, t in saved.items()}, admin)


# --------------------------------------------------------------------------- evaluating a packet (pure)


@dataclass(frozen=True)
class Packet:
    """A new inbound TCP connection, as the INPUT chain sees its first packet."""

    source: str
    dest: str
    dport: int
    interface: str | None  # None: unknown
    proto: str = "tcp"
    state: str = "NEW"


def _iface(pattern: str, name: str | None) -> bool | None:
    if name is None:
        return None
    if pattern.endswith("+"):
        return name.startswith(pattern[:-1])
    return name == pattern


def _ports(spec: str, port: int) -> bool:
    for part in spec.split(","):
        lo, _, hi = part.partition(":")
        if lo.isdigit() and (hi.isdigit() if hi else True):
            if int(lo) <= port <= int(hi or lo):
                return True
    return False


def match(rule: Sequence[str], pkt: Packet) -> tuple[bool | None, str | None]:
    """Whether ``rule`` (iptables-save tokens after ``-A CHAIN``) matches ``pkt``: True, False or
    None (cannot tell: an unknown match), and its target (``-j``/``-g``)."""
    result: bool | None = True
    target = None
    negate = False
    i = 0
    toks = list(rule)

    def fold(value: bool | None) -> None:
        nonlocal result, negate
        if value is not None and negate:
            value = not value
        negate = False
        if value is False:
            result = False
        elif value is None and result is True:
            result = None

    while i < len(toks):
        tok = toks[i]
        arg = toks[i + 1] if i + 1 < len(toks) else ""
        if tok == "!":
            negate = True
            i += 1
            continue
        if tok in ("-j", "--jump", "-g", "--goto"):
            target = arg
            i += 2
            continue
        if tok in ("-i", "--in-interface"):
            fold(_iface(arg, pkt.interface))
        elif tok in ("-o", "--out-interface"):
            fold(False if not negate else None)  # INPUT packets have no output interface
        elif tok in ("-s", "--source", "-d", "--destination"):
            addr = pkt.source if tok in ("-s", "--source") else pkt.dest
            try:
                fold(ipaddress.ip_address(addr) in ipaddress.ip_network(arg, strict=False))
            except (TypeError, ValueError):
                fold(None)
        elif tok in ("-p", "--protocol"):
            fold(arg == pkt.proto or arg == "all")
        elif tok in ("-m", "--match"):
            pass  # the module's options follow and are judged one by one
        elif tok in ("--dport", "--destination-port"):
            fold(_ports(arg, pkt.dport))
        elif tok in ("--dports", "--destination-ports"):
            fold(_ports(arg, pkt.dport))
        elif tok in ("--ctstate", "--state"):
            fold(pkt.state in arg.split(","))
        elif tok == "--comment":
            pass
        elif tok.startswith("-"):
            fold(None)  # a match dn cannot judge
            if i + 1 < len(toks) and not toks[i + 1].startswith("-") and toks[i + 1] != "!":
                i += 1
            i += 1
            continue
        else:
            i += 1
            continue
        i += 2
    return result, target


def evaluate(table: SavedTable, pkt: Packet, chain: str = "INPUT") -> str:
    """The verdict for ``pkt`` through ``chain``: "ACCEPT" or "DROP", decided conservatively: a
    rule whose match cannot be judged never accepts, but may drop."""

    def walk(name: str, depth: int) -> str | None:
        if depth > 16:
            return "DROP"
        for rule in table.chain(name):
            m, target = match(rule, pkt)
            if m is False or target is None:
                continue
            if target == "ACCEPT":
                if m is True:
                    return "ACCEPT"
            elif target in ("DROP", "REJECT"):
                return "DROP"
            elif target == "RETURN":
                if m is True:
                    return None
            elif target in table.policies:
                v = walk(target, depth + 1)
                if v == "DROP" or (v == "ACCEPT" and m is True):
                    return v
        return None

    v = walk(chain, 0)
    if v is not None:
        return v
    return "ACCEPT" if (table.policies.get(chain) or "ACCEPT") == "ACCEPT" else "DROP"


def simulate(rulesets: Sequence[Ruleset], current: Mapping[str, SavedTable]) -> SavedTable:
    """The filter table after applying ``rulesets`` (one family) to ``current``, as
    ``combined_restore_text`` would leave it."""
    return apply_restore(current, combined_restore_text(rulesets, current))


# --------------------------------------------------------------------------- plan (pure)


@dataclass(frozen=True)
class FirewallPlan(Plan):
    """A Plan plus what apply feeds ``iptables-restore``: ``restore`` (family, text) and the
    snapshot digest it was computed against."""

    restore: tuple[tuple[int, str], ...] = ()
    basis: str = ""
    touches_admin: bool = False  # INPUT policy or hooks change: re-test admin SSH afterwards
    rulesets: tuple[Ruleset, ...] = ()  # what the host must hold afterwards (or lose, if removing)
    removing: bool = False


def _admin_refusal(rulesets: Sequence[Ruleset], state: FirewallState, family: int) -> str | None:
    admin = state.admin
    if admin is None:
        return ("cannot tell which address dn connects from ($SSH_CONNECTION is not set on the host); "
                "refusing to change the INPUT chain blind")
    if admin.family != family:
        return None
    after = simulate(rulesets, state.tables.get(family, {}))
    pkt = Packet(admin.source, admin.address, admin.port, admin.interface)
    if evaluate(after, pkt) != "ACCEPT":
        return (f"the new IPv{family} rules would refuse new SSH connections from {admin.source} to "
                f"{admin.address}:{admin.port}, the address dn is connected from: dn would lock itself out")
    return None


def plan(rulesets: Sequence[Ruleset], state: FirewallState, *, name: str, where: str = "host") -> FirewallPlan:
    """What to restore, per family, to bring the host to ``rulesets``; refusals are notes that
    ``apply`` turns into errors before changing anything."""
    changes: list[Change] = []
    notes: list[str] = []
    restore: list[tuple[int, str]] = []
    touches_admin = False
    for family in sorted({r.family for r in rulesets}):
        mine = [r for r in rulesets if r.family == family]
        current = state.tables.get(family, {})
        drift = [d for r in mine for d in r.drift(current)]
        if not drift:
            continue
        text = combined_restore_text(mine, current)
        for table, chains in missing_chains(text, current).items():
            notes.append(f"refused: IPv{family} {table} chains {', '.join(sorted(chains))} are referenced but exist "
                         "neither in dn's rules nor on the host")
        if any(r.policies or any(h.chain == "INPUT" for h in r.hooks) for r in mine):
            touches_admin = True
            why = _admin_refusal(mine, state, family)
            if why:
                notes.append("refused: " + why)
        changes.append(Change("restore", f"IPv{family} {TABLE}", "; ".join(drift)))
        restore.append((family, text))
    return FirewallPlan(f"firewall {name} on {where}", tuple(changes), tuple(notes), tuple(restore),
                        state.basis(), touches_admin, tuple(rulesets))


def removal_plan(rulesets: Sequence[Ruleset], state: FirewallState, *, name: str, where: str = "host",
                 open_input: bool = False, drop_shared: Sequence[str] = ()) -> FirewallPlan:
    """What removes ``rulesets`` (their hooks and owned chains). ``open_input``: set INPUT's
    policy to ACCEPT first (removing the baseline must not lock dn out); ``drop_shared``: shared
    chains to delete too, when no rule remains in them."""
    changes: list[Change] = []
    notes: list[str] = []
    restore: list[tuple[int, str]] = []
    for family in sorted({r.family for r in rulesets}):
        mine = [r for r in rulesets if r.family == family]
        now = state.tables.get(family, {}).get(TABLE, SavedTable())
        lines = [f"*{TABLE}"]
        if open_input and now.policies.get("INPUT") not in (None, "ACCEPT"):
            lines.append(":INPUT ACCEPT [0:0]")
        for r in mine:
            lines += r.removal_text(state.tables.get(family, {})).splitlines()[1:-1]
        for chain in drop_shared:
            if chain not in now.policies:
                continue
            left = _foreign_rules(now, chain, mine)
            if left:
                notes.append(f"kept: IPv{family} chain {chain} still holds {len(left)} tenant rule(s)")
                continue
            lines.append(f"-X {chain}")
        lines.append("COMMIT")
        if len(lines) > 2:
            changes.append(Change("remove", f"IPv{family} {TABLE}", "; ".join(lines[1:-1])))
            restore.append((family, "\n".join(lines) + "\n"))
    return FirewallPlan(f"firewall {name} on {where}", tuple(changes), tuple(notes), tuple(restore),
                        state.basis(), open_input, tuple(rulesets), removing=True)


def _foreign_rules(table: SavedTable, chain: str, rulesets: Sequence[Ruleset]) -> list:
    """The rules of ``chain`` that are not ``rulesets``' own tails (e.g. tenants' hooks)."""
    tails = {t.rule for r in rulesets for t in r.tails if t.chain == chain}
    return [r for r in table.chain(chain) if r not in tails]


# --------------------------------------------------------------------------- apply


def _restore(s: "Session", family: int, text: str, *, test: bool = False, noflush: bool = True) -> None:
    argv = [RESTORE[family], "-w"] + (["--test"] if test else []) + (["--noflush"] if noflush else [])
    r = s.run(argv, stdin=text.encode(), check=False)
    if r.rc != 0:
        err = r.stderr.decode("utf-8", "replace").strip()[-1200:]
        raise ApplyRefused(f"{s.where}: `{' '.join(argv)}` refused dn's IPv{family} rules (exit {r.rc}): {err}")


def _owned(the_plan: "FirewallPlan", family: int) -> set[str]:
    return {c for r in the_plan.rulesets if r.family == family for c in r.chains}


def _left(snapshot: FirewallState, the_plan: "FirewallPlan") -> dict[int, SavedTable]:
    """Per family, the filter table as the plan's restore leaves the snapshot."""
    return {f: apply_restore(snapshot.tables.get(f, {}), text) for f, text in the_plan.restore}


def _table(state: FirewallState, family: int) -> SavedTable:
    return state.tables.get(family, {}).get(TABLE, SavedTable())


def _rollback(s: "Session", snapshot: FirewallState, the_plan: "FirewallPlan", cause: BaseException) -> None:
    failed = []
    left = _left(snapshot, the_plan)
    for f in left:
        try:
            before, owned = _table(snapshot, f), _owned(the_plan, f)
            live = parse_save(s.run([SAVE[f]]).text).get(TABLE, SavedTable())
            _restore(s, f, undo_text(before, left[f], live, owned, cas=False))
            now = parse_save(s.run([SAVE[f]]).text).get(TABLE, SavedTable())
            problems = undo_problems(before, left[f], now, owned)
            if problems:
                failed.append(f"IPv{f}: the restored rules differ from the snapshot: " + "; ".join(problems))
        except DnError as e:
            failed.append(f"IPv{f}: {e}")
    if failed:
        raise OperationFailed(f"{s.where}: firewall apply failed ({cause}) and restoring the previous rules failed too: "
                              + "; ".join(failed),
                              hint=f"the host restores its saved rules by itself within {DEADMAN_S:g}s if the "
                                   "dead-man timer was armed; check the host's console") from cause


def _arm(s: "Session", host: HostBaseline, snapshot: FirewallState, the_plan: "FirewallPlan",
         deadman: float) -> list[str]:
    d = host.path(f"{host.data_dir.rstrip('/')}/firewall")
    s.mkdir_p(d, mode=0o700)
    tag = secrets.token_hex(4)
    paths = {f: f"{d}/rollback-{tag}.v{f}" for f in FAMILIES}
    families = [f for f, _ in the_plan.restore]
    for f, left in _left(snapshot, the_plan).items():
        undo = undo_text(_table(snapshot, f), left, left, _owned(the_plan, f), cas=True)
        s.install_file(paths[f], undo.encode(), mode=0o600, keep_previous=False)
    s.run(["setsid", "-f", "sh", "-c", DEADMAN_SCRIPT, "dn-firewall-deadman", f"{deadman:g}",
           paths[4] if 4 in families else f"{d}/absent", paths[6] if 6 in families else f"{d}/absent"])
    return [paths[f] for f in families]


def _disarm(s: "Session", armed: Sequence[str]) -> list[str]:
    """Remove the undo files; returns those already gone (their dead-man timer fired)."""
    return [p for p in armed if not s.remove(p)]


def superseded(undo: str, owned: set[str]) -> bool:
    """Whether a pending dead-man ``undo`` takes back nothing but chains in ``owned`` (the chains
    it deletes or makes again), so that a later apply of those chains, which has just found them
    as it wants them over a live connection, makes it obsolete."""
    remade = {toks[1] for toks in (line.split() for line in undo.splitlines())
              if len(toks) == 2 and toks[0] in ("-X", "-N")}
    return bool(remade) and remade <= owned


def _supersede(s: "Session", host: HostBaseline, the_plan: "FirewallPlan") -> None:
    """Disarm earlier dead-man timers of the same chains: this apply's result is confirmed (a
    rerun after a lost connection would otherwise be undone by the first run's timer)."""
    d = host.path(f"{host.data_dir.rstrip('/')}/firewall")
    if not s.exists(d):
        return
    for name in s.listdir(d):
        path = f"{d}/{name}"
        if not name.startswith("rollback-"):
            continue
        try:
            undo = s.read_file(path).decode("utf-8", "replace")
        except (OSError, DnError):
            continue  # fired (and removed) meanwhile
        if superseded(undo, _owned(the_plan, 6 if name.endswith(".v6") else 4)):
            s.remove(path)


def apply(session: "Session", host: HostBaseline, the_plan: FirewallPlan, *, progress: Progress = no_progress,
          reconnect: Callable[[], "Session"] | None = None, deadman: float = DEADMAN_S) -> FirewallState:
    """Carry out ``the_plan``. Returns the state afterwards (the snapshot if nothing changed).

    Raises PolicyViolation (a refusal: nothing changed), ApplyRefused (iptables or the check
    refused; the previous rules are back exactly), OperationFailed (the firewall changed since
    the plan, or restoring failed), Unreachable. ``reconnect`` opens a new session to the host
    for the admin check (default: ``dn.ssh.connect(session.target)``).
    """
    s = session
    refused = [n.removeprefix("refused: ") for n in the_plan.notes if n.startswith("refused: ")]
    if refused:
        raise PolicyViolation(f"{s.where}: {the_plan.resource}: " + "; ".join(refused),
                              hint="fix the host's admin_sources or the rules; nothing was changed")
    progress("save")
    snapshot = read(s, families=FAMILIES)
    if the_plan.empty:
        _supersede(s, host, the_plan)
        return snapshot
    if snapshot.basis() != the_plan.basis:
        raise OperationFailed(f"{s.where}: the firewall changed since {the_plan.resource} was planned; nothing was changed",
                              hint="plan again (rerun)")
    progress("arm")
    armed = _arm(s, host, snapshot, the_plan, deadman)
    fired: list[str] = []
    try:
        progress("validate")
        for f, text in the_plan.restore:
            _restore(s, f, text, test=True)
        progress("apply")
        try:
            for f, text in the_plan.restore:
                progress(f"apply:{f}")
                _restore(s, f, text)
            progress("check")
            after = read(s, families=FAMILIES)
            problems = _check(after, the_plan)
            if problems:
                raise ApplyRefused(f"{s.where}: after the apply the rules are not as rendered: " + "; ".join(problems))
            if the_plan.touches_admin:
                _check_admin(s, reconnect)
        except DnError as e:
            progress("rollback")
            _rollback(s, snapshot, the_plan, e)
            raise ApplyRefused(f"{e}; the previous rules were restored exactly", hint=e.hint) from e
    finally:
        if s.active:
            fired = _disarm(s, armed)
    if fired:
        # The timer ran while dn was still applying: it put the previous rules back, or refused
        # to (they had changed since); either way the host is not known to be as planned.
        raise ApplyRefused(f"{s.where}: the firewall's dead-man timer fired before the apply was confirmed "
                           f"(it took longer than {deadman:g}s): the host may be back on its previous rules; "
                           "its log says which (tag dn-firewall-deadman)", hint="rerun to apply again")
    _supersede(s, host, the_plan)
    progress("done")
    return after


def _check(after: FirewallState, the_plan: FirewallPlan) -> list[str]:
    problems = []
    for rs in the_plan.rulesets:
        now = after.tables.get(rs.family, {})
        if the_plan.removing:
            table = now.get(TABLE, SavedTable())
            problems += [f"IPv{rs.family}: chain {c} still exists" for c in rs.chains if c in table.policies]
            problems += [f"IPv{rs.family}: jump '{' '.join(h.rule)}' still in {h.chain}" for h in rs.hooks
                         if table.count(h.chain, h.rule)]
        else:
            problems += [f"IPv{rs.family}: {d}" for d in rs.drift(now)]
    return problems


def _check_admin(s: "Session", reconnect: Callable[[], "Session"] | None) -> None:
    from dn import ssh

    try:
        fresh = reconnect() if reconnect else ssh.connect(s.target)
        with fresh:
            fresh.run(["true"])
    except DnError as e:
        raise ApplyRefused(f"{s.where}: after the apply a new SSH connection failed ({e})") from e


# --------------------------------------------------------------------------- what dn applies


def baseline_rulesets(host: HostBaseline) -> list[Ruleset]:
    """The host baseline, IPv4 and IPv6."""
    rs = render_baseline(host)
    return [rs[4], rs[6]]


def tenant_rulesets(host: HostBaseline, tenant: "TenantSpec", extra_bridges: Sequence[str] = ()) -> list[Ruleset]:
    """One tenant's chains. Bridges named by dn's scheme (``dnt...``) are isolated by the
    ``dnt+`` match; ``extra_bridges`` are other bridges to isolate the tenant from by name."""
    return [render_tenant_rules(tenant, [tenant.bridge, *extra_bridges], host_services=host.tenant_host_services)]


def converge_baseline(session: "Session", host: HostBaseline, *, progress: Progress = no_progress,
                      reconnect: Callable[[], "Session"] | None = None, deadman: float = DEADMAN_S) -> FirewallPlan:
    """read → plan → apply of the host baseline; returns the plan carried out."""
    state = read(session)
    p = plan(baseline_rulesets(host), state, name="baseline", where=session.where)
    apply(session, host, p, progress=progress, reconnect=reconnect, deadman=deadman)
    return p


def converge_tenant(session: "Session", host: HostBaseline, tenant: "TenantSpec", *,
                    extra_bridges: Sequence[str] = (), progress: Progress = no_progress,
                    deadman: float = DEADMAN_S) -> FirewallPlan:
    """read → plan → apply of one tenant's chains; returns the plan carried out."""
    state = read(session)
    rulesets = tenant_rulesets(host, tenant, extra_bridges)
    p = plan(rulesets, state, name=f"tenant {tenant.slug}", where=session.where)
    why = baseline_refusal(rulesets, state)
    if why:
        p = FirewallPlan(p.resource, p.changes, p.notes + ("refused: " + why,), p.restore, p.basis,
                         p.touches_admin, p.rulesets, p.removing)
    apply(session, host, p, progress=progress, deadman=deadman)
    return p


def baseline_refusal(rulesets: Sequence[Ruleset], state: FirewallState) -> str | None:
    """Why a tenant's chains would not isolate it on this host, or None. A tenant's chains only
    isolate it inside the baseline's closed-by-default path (FORWARD → DOCKER-USER →
    DN-TENANTS-FWD ending in the drop for every tenant bridge); without it the tenant's containers
    would reach everything, so a tenant firewall is refused until ``dn host up`` put it there."""
    after = {f: simulate([r for r in rulesets if r.family == f], state.tables.get(f, {}))
             if any(r.family == f for r in rulesets) else _table(state, f) for f in FAMILIES}
    fails, _ = default_closed_findings(after[4], after[6])
    if not fails:
        return None
    return ("the host baseline does not close tenant bridges by default (" + "; ".join(fails[:3])
            + (f"; {len(fails) - 3} more" if len(fails) > 3 else "")
            + "): a tenant's chains would not isolate it; run `dn host up` first")


def remove_tenant(session: "Session", host: HostBaseline, tenant: "TenantSpec", *,
                  progress: Progress = no_progress, deadman: float = DEADMAN_S) -> FirewallPlan:
    """Remove one tenant's hooks and chains."""
    state = read(session)
    p = removal_plan(tenant_rulesets(host, tenant), state, name=f"tenant {tenant.slug}", where=session.where)
    apply(session, host, p, progress=progress, deadman=deadman)
    return p


def remove_baseline(session: "Session", host: HostBaseline, *, progress: Progress = no_progress,
                    reconnect: Callable[[], "Session"] | None = None, deadman: float = DEADMAN_S) -> FirewallPlan:
    """Remove the baseline's hooks and chains, opening INPUT first so dn keeps its access; the
    FORWARD policy stays (Docker sets it too). Refused while tenant chains are still hooked."""
    state = read(session)
    p = removal_plan(baseline_rulesets(host), state, name="baseline", where=session.where,
                     open_input=True, drop_shared=(TENANTS_IN, TENANTS_FWD))
    hooked = [f"IPv{f} {c}" for f in state.tables for c in (TENANTS_FWD, TENANTS_IN)
              if _foreign_rules(_table(state, f), c, baseline_rulesets(host))]
    if hooked:
        p = FirewallPlan(p.resource, p.changes, p.notes + (
            f"refused: tenant chains are still hooked in {', '.join(hooked)}: removing the baseline would "
            "lift their isolation; remove the tenants first",), p.restore, p.basis, p.touches_admin, p.rulesets, True)
    apply(session, host, p, progress=progress, reconnect=reconnect, deadman=deadman)
    return p
