"""iptables rules for an EU host (baseline) and for each tenant (templates in ``templates/iptables/``).

Design (filter table):

- dn only ever rewrites its **own chains**. In an ``iptables-restore --noflush`` file, declaring a
  user chain (``:DN-INPUT - [0:0]``) creates it or, if it exists, flushes it; the rules that
  follow rebuild it. Docker's chains and anyone else's rules are left alone.
- dn's chains are reached through **hooks**: single jump rules dn keeps exactly once at the top
  of a chain it does not own (``INPUT -j DN-INPUT``, ``DOCKER-USER -j DN-TENANTS-FWD``,
  ``DN-TENANTS-FWD -i <bridge> -g DN-T-<H>``). Whether a hook must be inserted (missing) or
  deleted (duplicated) depends on the live ruleset, so ``Ruleset.restore_text(current)`` takes
  the parsed ``iptables-save`` output and emits ``-I``/``-D`` lines only as needed: applying twice
  leaves every hook exactly once. Any other jump into a chain dn owns (an earlier form of a hook)
  is deleted: dn's chains are entered through their hooks only.
- **Tails** are the other way round: a rule dn keeps exactly once as the *last* rule of a chain
  it does not own (the baseline's default drop at the end of ``DN-TENANTS-FWD``).
- Shared dispatch chains (``DN-TENANTS-FWD``, ``DN-TENANTS-IN``) are **ensured**: created when
  missing, never flushed, because every tenant keeps its own hook in them.

Host baseline (``render_baseline``), IPv4 and IPv6: INPUT (and FORWARD) policy DROP; ``DN-INPUT``
accepts loopback, established/related, essential ICMP (rate-limited echo), tcp 80/443 from
anywhere and SSH only from the admin sources. Traffic from tenant bridges (``dnt+``) to the host
goes to ``DN-TENANTS-IN`` and is otherwise dropped. Traffic forwarded from tenant bridges goes
(``DOCKER-USER``, which Docker keeps first in ``FORWARD``, before its own ACCEPTs) to
``DN-TENANTS-FWD``, whose tail drops everything from ``dnt+``: a tenant bridge is **closed by
default**. Only a tenant's own hook (``-i <bridge> -g DN-T-<H>``, a *goto*: when the tenant's chain
returns, evaluation continues in ``DOCKER-USER`` after the jump, past the tail) lets its allowed
traffic on to Docker's rules. A bridge whose chain is not in place yet, or whose apply failed or
was refused, or that belongs to no tenant at all, forwards nothing. Tenant networks are IPv4-only:
the IPv6 ruleset drops everything to, from or through tenant bridges.

Tenant (``render_tenant_rules``, IPv4): ``DN-T-<H>`` (entered for packets forwarded from the
tenant's bridge) returns established traffic to Docker's rules, drops anything towards other
tenants' bridges (``dnt+`` and any extra bridges named), ``docker0`` and private, loopback,
link-local, CGNAT, multicast and reserved ranges; the rest (egress to the internet, which sGTM
needs to forward tags) returns to Docker's rules, which accept it. ``DN-TI-<H>`` (entered for
packets from the bridge to the host) accepts established traffic and tcp 443 (the host's own
nginx, as reachable from the internet anyway: the tagging server reaches its preview server
through it) plus the host's ``tenant_host_services``; everything else is dropped, so tenant
containers cannot reach SSH, PostgreSQL, dockerd or any other host service.

Rules are written in iptables-save's canonical form (``-s`` before ``-p``, ``-m tcp``, numeric
ICMP types, ``RELATED,ESTABLISHED``, quoted comments) so what dn renders compares equal to what
``iptables-save`` prints after loading it (``Ruleset.drift``).
"""
from __future__ import annotations

import copy
import ipaddress
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from dn.errors import InvalidInput
from dn.models import BRIDGE_PREFIX, HostBaseline, TenantSpec
from dn.render import environment, ipt

TABLE = "filter"
TENANTS_FWD = "DN-TENANTS-FWD"
TENANTS_IN = "DN-TENANTS-IN"
DN_INPUT = "DN-INPUT"
DN_FORWARD = "DN-FORWARD"
DOCKER_USER = "DOCKER-USER"

# Destinations tenant containers may never reach by forwarding (IPv4).
BLOCKED_EGRESS_V4 = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
)
# ICMPv6 the host needs: destination unreachable, packet too big, time exceeded, parameter
# problem, router solicitation/advertisement, neighbour solicitation/advertisement.
ICMPV6_ESSENTIAL = (1, 2, 3, 4, 133, 134, 135, 136)

BUILTIN_CHAINS: Mapping[str, frozenset[str]] = {
    "filter": frozenset({"INPUT", "FORWARD", "OUTPUT"}),
    "nat": frozenset({"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"}),
    "mangle": frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}),
    "raw": frozenset({"PREROUTING", "OUTPUT"}),
    "security": frozenset({"INPUT", "FORWARD", "OUTPUT"}),
}
BUILTIN_TARGETS = frozenset(
    """ACCEPT DROP RETURN REJECT LOG QUEUE NFQUEUE NFLOG ULOG MARK CONNMARK DNAT SNAT MASQUERADE
    REDIRECT NETMAP TCPMSS CT NOTRACK TRACE AUDIT CHECKSUM CLASSIFY TEE SET TPROXY SECMARK
    CONNSECMARK DSCP TOS TTL HL IDLETIMER LED RATEEST SYNPROXY HMARK CLUSTERIP""".split()
)

Rule = tuple[str, ...]
# The baseline's default for tenant bridges: the last rule of DN-TENANTS-FWD. Tenants' hooks are
# gotos, so a tenant's allowed traffic never comes back to it.
TENANTS_DEFAULT_DROP: Rule = ("-i", f"{BRIDGE_PREFIX}+", "-m", "comment", "--comment", "dn:tenants-default-drop",
                              "-j", "DROP")


# --------------------------------------------------------------------------- iptables-save parsing


@dataclass
class SavedTable:
    """One table of ``iptables-save`` output: chain policies (None for user chains) and rules."""

    policies: dict[str, str | None] = field(default_factory=dict)
    rules: dict[str, list[Rule]] = field(default_factory=dict)

    def chain(self, name: str) -> list[Rule]:
        return self.rules.get(name, [])

    def count(self, chain: str, rule: Rule) -> int:
        return sum(1 for r in self.chain(chain) if r == rule)


# iptables-save quotes an argument with double quotes and escapes '"' and '\\' inside it.
_TOKEN_RE = re.compile(r'"((?:[^"\\]|\\.)*)"(?=\s|$)|([^\s"]+)|(\S)')
_UNESCAPE_RE = re.compile(r"\\(.)")


def _tokens(line: str, lineno: int) -> list[str]:
    out = []
    for quoted, plain, stray in _TOKEN_RE.findall(line):
        if stray:
            raise InvalidInput("iptables-save", f"line {lineno}: cannot be split into arguments (unbalanced quote)")
        out.append(_UNESCAPE_RE.sub(r"\1", quoted) if quoted or not plain else plain)
    return out


def parse_save(text: str) -> dict[str, SavedTable]:
    """Parse ``iptables-save`` (or ``-c``) output into a normalized form: per table, chain
    policies and each chain's rules as argument tuples, counters and comments dropped."""
    tables: dict[str, SavedTable] = {}
    cur: SavedTable | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            cur = tables.setdefault(line[1:], SavedTable())
            continue
        if line == "COMMIT":
            cur = None
            continue
        if cur is None:
            raise InvalidInput("iptables-save", f"line {n}: rule outside a table")
        if line.startswith(":"):
            name, policy = (line[1:].split() + ["-"])[:2]
            cur.policies[name] = None if policy == "-" else policy
            cur.rules.setdefault(name, [])
            continue
        if line.startswith("["):  # iptables-save -c: "[pkts:bytes] -A CHAIN ..."
            line = line.split("]", 1)[1].strip()
        toks = _tokens(line, n)
        if len(toks) < 2 or toks[0] != "-A":
            raise InvalidInput("iptables-save", f"line {n}: expected '-A CHAIN ...'")
        cur.rules.setdefault(toks[1], []).append(tuple(toks[2:]))
    return tables


# --------------------------------------------------------------------------- chain references


def _restore_lines(text: str) -> Iterable[tuple[str, str, list[str]]]:
    table = ""
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            table = line[1:]
        elif line == "COMMIT":
            table = ""
        elif line.startswith(":"):
            yield table, "decl", [line[1:].split()[0]]
        else:
            yield table, "rule", _tokens(line, n)


def declared_chains(text: str) -> dict[str, set[str]]:
    """Chains a restore file declares (``:NAME``) or creates (``-N NAME``), per table."""
    out: dict[str, set[str]] = {}
    for table, kind, toks in _restore_lines(text):
        if kind == "decl":
            out.setdefault(table, set()).add(toks[0])
        elif toks and toks[0] in ("-N", "--new-chain") and len(toks) > 1:
            out.setdefault(table, set()).add(toks[1])
    return out


def referenced_chains(text: str) -> dict[str, set[str]]:
    """Every chain a restore file uses, per table: rule chains (-A/-I/-D/-R/-F/-X/-Z/-P/-N) and
    jump or goto targets that are not built-in targets. Built-in chains are included."""
    out: dict[str, set[str]] = {}
    for table, kind, toks in _restore_lines(text):
        refs = out.setdefault(table, set())
        if kind == "decl":
            refs.add(toks[0])
            continue
        for i, tok in enumerate(toks):
            nxt = toks[i + 1] if i + 1 < len(toks) else None
            if nxt is None:
                break
            if i == 0 and tok in ("-A", "-I", "-D", "-R", "-F", "-X", "-Z", "-P", "-N", "--append",
                                  "--insert", "--delete", "--replace", "--flush", "--delete-chain",
                                  "--zero", "--policy", "--new-chain"):
                refs.add(nxt)
            elif tok in ("-j", "--jump", "-g", "--goto") and nxt not in BUILTIN_TARGETS:
                refs.add(nxt)
    return out


def missing_chains(text: str, current: Mapping[str, SavedTable]) -> dict[str, set[str]]:
    """Chains ``text`` references that neither it declares nor exist in ``current`` (parsed
    iptables-save) nor are built in. ``iptables-nft-restore --test`` does not catch these."""
    declared = declared_chains(text)
    out: dict[str, set[str]] = {}
    for table, refs in referenced_chains(text).items():
        existing = set(current.get(table, SavedTable()).policies)
        missing = refs - declared.get(table, set()) - existing - BUILTIN_CHAINS.get(table, frozenset())
        if missing:
            out[table] = missing
    return out


# --------------------------------------------------------------------------- rulesets


def format_rule(verb: str, chain: str, rule: Rule) -> str:
    """One restore line; comment values are double-quoted as iptables-save prints them."""
    parts = [verb, chain]
    for i, tok in enumerate(rule):
        if i and rule[i - 1] == "--comment":
            parts.append('"' + tok.replace("\\", "\\\\").replace('"', '\\"') + '"')
        else:
            parts.append(tok)
    return " ".join(parts)


def rule_target(rule: Rule) -> str | None:
    """The ``-j``/``-g`` target of a rule (iptables-save tokens after ``-A CHAIN``), if any."""
    for i, tok in enumerate(rule[:-1]):
        if tok in ("-j", "--jump", "-g", "--goto"):
            return rule[i + 1]
    return None


@dataclass(frozen=True)
class Hook:
    """A jump dn keeps exactly once at the top of a chain it does not own."""

    chain: str
    rule: Rule


@dataclass(frozen=True)
class Ruleset:
    """A part of the filter table dn owns, for one address family."""

    family: int
    chains: tuple[str, ...]  # owned: declared (created or flushed) and rebuilt on every apply
    rules: tuple[tuple[str, Rule], ...]
    ensure: tuple[str, ...] = ()  # shared: created when missing, never flushed
    hooks: tuple[Hook, ...] = ()
    policies: tuple[tuple[str, str], ...] = ()  # built-in chain policies
    table: str = TABLE
    tails: tuple[Hook, ...] = ()  # rules kept exactly once at the end of a chain dn does not own

    @property
    def save_command(self) -> str:
        return "iptables-save" if self.family == 4 else "ip6tables-save"

    @property
    def restore_command(self) -> str:
        return "iptables-restore" if self.family == 4 else "ip6tables-restore"

    def expected(self) -> dict[str, list[Rule]]:
        """The rules each owned chain must hold, in order."""
        out: dict[str, list[Rule]] = {c: [] for c in self.chains}
        for chain, rule in self.rules:
            out[chain].append(rule)
        return out

    def restore_text(self, current: Mapping[str, SavedTable]) -> str:
        """The ``iptables-restore --noflush`` input that brings ``current`` to this ruleset."""
        now = current.get(self.table, SavedTable())
        lines = [f"*{self.table}"]
        lines += [f":{chain} {policy} [0:0]" for chain, policy in self.policies]
        lines += [f":{c} - [0:0]" for c in self.chains]
        lines += [f":{c} - [0:0]" for c in self.ensure if c not in now.policies and c not in self.chains]
        lines += [format_rule("-A", chain, rule) for chain, rule in self.rules]
        # Inserting at 1 in reverse order leaves the hooks in their listed order at the top.
        for hook in reversed(self.hooks):
            n = now.count(hook.chain, hook.rule)
            if n == 0:
                lines.append(format_rule("-I", hook.chain, ("1",) + hook.rule))
            lines += [format_rule("-D", hook.chain, hook.rule)] * max(0, n - 1)
        lines += [format_rule("-D", chain, rule) for chain, rule in self.stale_jumps(now)]
        for tail in self.tails:
            rules = now.chain(tail.chain)
            if rules.count(tail.rule) == 1 and rules[-1] == tail.rule:
                continue
            lines += [format_rule("-D", tail.chain, tail.rule)] * rules.count(tail.rule)
            lines.append(format_rule("-A", tail.chain, tail.rule))
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"

    def stale_jumps(self, now: SavedTable) -> list[tuple[str, Rule]]:
        """Rules outside this ruleset's chains that jump into one of them but are none of its
        hooks (an earlier form of a hook, or a jump added by hand)."""
        owned = set(self.chains)
        hooks = {(h.chain, h.rule) for h in self.hooks}
        return [(chain, rule) for chain, rules in now.rules.items() if chain not in owned for rule in rules
                if rule_target(rule) in owned and (chain, rule) not in hooks]

    def removal_text(self, current: Mapping[str, SavedTable]) -> str:
        """The restore input that removes this ruleset's hooks and owned chains (shared chains
        and policies stay)."""
        now = current.get(self.table, SavedTable())
        lines = [f"*{self.table}"]
        for hook in self.hooks:
            lines += [format_rule("-D", hook.chain, hook.rule)] * now.count(hook.chain, hook.rule)
        lines += [format_rule("-D", chain, rule) for chain, rule in self.stale_jumps(now)]
        for tail in self.tails:
            lines += [format_rule("-D", tail.chain, tail.rule)] * now.count(tail.chain, tail.rule)
        present = [c for c in self.chains if c in now.policies]
        lines += [f"-F {c}" for c in present]
        lines += [f"-X {c}" for c in present]
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"

    def drift(self, current: Mapping[str, SavedTable]) -> list[str]:
        """Differences between this ruleset and the live one; empty when in place."""
        now = current.get(self.table, SavedTable())
        out = []
        for chain, policy in self.policies:
            if now.policies.get(chain) != policy:
                out.append(f"{chain}: policy is {now.policies.get(chain)}, expected {policy}")
        for chain, rules in self.expected().items():
            if chain not in now.policies:
                out.append(f"{chain}: chain missing")
            elif now.chain(chain) != rules:
                out.append(f"{chain}: rules differ from the rendered ruleset")
        for chain in self.ensure:
            if chain not in now.policies:
                out.append(f"{chain}: chain missing")
        for hook in self.hooks:
            n = now.count(hook.chain, hook.rule)
            if n != 1:
                out.append(f"{hook.chain}: jump '{' '.join(hook.rule)}' present {n} times, expected once")
        for chain, rule in self.stale_jumps(now):
            out.append(f"{chain}: stray jump '{' '.join(rule)}' into dn's chain")
        for tail in self.tails:
            rules = now.chain(tail.chain)
            n = rules.count(tail.rule)
            if n != 1 or rules[-1] != tail.rule:
                out.append(f"{tail.chain}: '{' '.join(tail.rule)}' present {n} times"
                           + (", not last" if n and rules[-1] != tail.rule else "") + ", expected once as the last rule")
        return out


def _parse_rendered(text: str) -> tuple[tuple[str, Rule], ...]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        toks = _tokens(line, n)
        out.append((toks[1], tuple(toks[2:])))
    return tuple(out)


def _env():
    return environment("iptables", ipt)


_BRIDGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")


def _check_bridge(name: str) -> str:
    if not isinstance(name, str) or not _BRIDGE_RE.fullmatch(name):
        raise InvalidInput("bridges", f"{name!r} is not a Linux interface name (1-15 of A-Z a-z 0-9 _ . -, not starting with - _ .)")
    return name


def render_tenant_rules(
    tenant: TenantSpec,
    all_tenant_bridges: Sequence[str],
    *,
    host_services: Sequence[str] = (),
) -> Ruleset:
    """The IPv4 ruleset isolating one tenant's network.

    ``all_tenant_bridges``: the bridges of every tenant on the host (this one included) and any
    other bridge to isolate from. Names following dn's scheme are covered by the ``dnt+`` match;
    others get an explicit drop. A name equal to this tenant's bridge listed twice means two
    tenants share a bridge name, which is refused. ``host_services``: ``tcp/PORT`` or
    ``udp/PORT`` host services the containers may reach (``HostBaseline.tenant_host_services``).
    """
    counts, others = _bridge_index(all_tenant_bridges)
    return _tenant_ruleset(tenant, counts, others, _services(host_services))


def _bridge_index(all_bridges: Sequence[str]) -> tuple[Counter[str], list[str]]:
    counts = Counter(_check_bridge(b) for b in all_bridges)
    return counts, sorted(b for b in counts if not b.startswith(BRIDGE_PREFIX))


def _services(host_services: Sequence[str]) -> list[tuple[str, int]]:
    out = []
    for s in host_services:
        proto, _, port = s.partition("/")
        if proto not in ("tcp", "udp") or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise InvalidInput("tenant_host_services", f"{s!r} must be 'tcp/PORT' or 'udp/PORT'")
        out.append((proto, int(port)))
    return out


def _tenant_ruleset(tenant: TenantSpec, counts: Counter[str], others: list[str], services: list[tuple[str, int]]) -> Ruleset:
    if counts[tenant.bridge] > 1:
        raise InvalidInput("bridges", f"bridge {tenant.bridge} of {tenant.slug!r} is used by another tenant too", where=tenant.slug)
    text = _env().get_template("tenant.rules.j2").render(
        t=tenant, bridge_prefix=BRIDGE_PREFIX, other_bridges=others, blocked=BLOCKED_EGRESS_V4, services=services
    )
    return Ruleset(
        family=4,
        chains=(tenant.chain_forward, tenant.chain_input),
        rules=_parse_rendered(text),
        ensure=(TENANTS_FWD, TENANTS_IN),
        hooks=(
            # a goto: the tenant chain's RETURN resumes in DOCKER-USER, past DN-TENANTS-FWD's default drop
            Hook(TENANTS_FWD, ("-i", tenant.bridge, "-g", tenant.chain_forward)),
            Hook(TENANTS_IN, ("-i", tenant.bridge, "-j", tenant.chain_input)),
        ),
    )


def render_baseline(host: HostBaseline) -> dict[int, Ruleset]:
    """The host baseline rulesets, ``{4: ..., 6: ...}``."""
    env = _env()
    out = {}
    for family in (4, 6):
        text = env.get_template("baseline.rules.j2").render(
            host=host,
            family=family,
            bridge_prefix=BRIDGE_PREFIX,
            public_ports=",".join(str(p) for p in host.public_ports),
            admin_sources=[_canonical_cidr(c) for c in (host.admin_sources_v4 if family == 4 else host.admin_sources_v6)],
            icmpv6=ICMPV6_ESSENTIAL,
        )
        if family == 4:
            out[4] = Ruleset(
                family=4,
                chains=(DN_INPUT,),
                rules=_parse_rendered(text),
                ensure=(TENANTS_IN, TENANTS_FWD, DOCKER_USER),
                hooks=(Hook("INPUT", ("-j", DN_INPUT)), Hook(DOCKER_USER, ("-j", TENANTS_FWD))),
                policies=(("INPUT", "DROP"), ("FORWARD", "DROP")),
                tails=(Hook(TENANTS_FWD, TENANTS_DEFAULT_DROP),),
            )
        else:
            out[6] = Ruleset(
                family=6,
                chains=(DN_INPUT, DN_FORWARD),
                rules=_parse_rendered(text),
                hooks=(Hook("INPUT", ("-j", DN_INPUT)), Hook("FORWARD", ("-j", DN_FORWARD))),
                policies=(("INPUT", "DROP"), ("FORWARD", "DROP")),
            )
    return out


def _canonical_cidr(cidr: str) -> str:
    # iptables-save prints a host as /32 (/128) and the network address with host bits cleared.
    return str(ipaddress.ip_network(cidr, strict=False))


def render_tenants(tenants: Sequence[TenantSpec], host: HostBaseline) -> list[Ruleset]:
    """Every tenant's ruleset for one host."""
    counts, others = _bridge_index([t.bridge for t in tenants])
    services = _services(host.tenant_host_services)
    return [_tenant_ruleset(t, counts, others, services) for t in tenants]


def combined_restore_text(rulesets: Sequence[Ruleset], current: Mapping[str, SavedTable]) -> str:
    """One restore input (one transaction) for several rulesets of the same family and table."""
    if not rulesets:
        return ""
    families = {r.family for r in rulesets}
    if len(families) != 1:
        raise InvalidInput("rulesets", "cannot combine IPv4 and IPv6 rulesets in one restore")
    bodies = [r.restore_text(current).splitlines()[1:-1] for r in rulesets]
    decls = []
    seen = set()
    for body in bodies:
        for line in body:
            if line.startswith(":") and line not in seen:
                seen.add(line)
                decls.append(line)
    rules = [line for body in bodies for line in body if not line.startswith(":")]
    return "\n".join([f"*{rulesets[0].table}", *decls, *rules, "COMMIT"]) + "\n"


# --------------------------------------------------------------------------- restore, simulated and undone


def apply_restore(current: Mapping[str, SavedTable], text: str, table: str = TABLE) -> SavedTable:
    """``table`` as ``iptables-restore --noflush`` of ``text`` would leave ``current`` (pure).

    Lenient: a command the real restore would refuse (deleting a rule that is not there,
    appending to a chain that does not exist) is carried out as far as it can be or skipped;
    ``missing_chains`` and the host's own restore judge those."""
    t = copy.deepcopy(current.get(table, SavedTable()))
    builtin = BUILTIN_CHAINS.get(table, frozenset())
    inside = ""
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            inside = line[1:]
            continue
        if line == "COMMIT":
            inside = ""
            continue
        if inside != table:
            continue
        if line.startswith(":"):
            name, policy = (line[1:].split() + ["-"])[:2]
            if name in builtin:
                if policy != "-":
                    t.policies[name] = policy
                t.rules.setdefault(name, [])
            else:
                t.policies[name] = None
                t.rules[name] = []
            continue
        toks = _tokens(line, n)
        if len(toks) < 2:
            continue
        verb, chain, rule = toks[0], toks[1], tuple(toks[2:])
        if verb in ("-A", "-I", "-N"):
            t.policies.setdefault(chain, None)
            rules = t.rules.setdefault(chain, [])
            if verb == "-A":
                rules.append(rule)
            elif verb == "-I":
                pos = int(rule[0]) - 1 if rule and rule[0].isdigit() else 0
                rules.insert(max(0, pos), rule[1:] if rule and rule[0].isdigit() else rule)
        elif verb == "-D" and rule in t.rules.get(chain, []):
            t.rules[chain].remove(rule)  # the first occurrence, as iptables does
        elif verb == "-F" and chain in t.rules:
            t.rules[chain] = []
        elif verb == "-X" and chain not in builtin:
            t.policies.pop(chain, None)
            t.rules.pop(chain, None)
        elif verb == "-P" and rule:
            t.policies[chain] = rule[0]
    return t


def changed_chains(before: SavedTable, after: SavedTable, owned: Iterable[str], table: str = TABLE
                   ) -> tuple[list[str], list[str]]:
    """(replaced, delta): the chains an apply changed, split by how an undo treats them.
    *Replaced*: chains the apply rewrote whole (``owned``), created or deleted; they go back to
    their earlier content. *Delta*: every other chain it changed (built-ins, Docker's, the shared
    dispatch chains), where only the rules it added or deleted are taken back: other tenants'
    hooks in the same chain are not its business."""
    builtin = BUILTIN_CHAINS.get(table, frozenset())
    owned = set(owned)
    names = sorted(set(before.policies) | set(after.policies))
    touched = [c for c in names if (c in before.policies) != (c in after.policies) or before.chain(c) != after.chain(c)]
    replaced = [c for c in touched if c not in builtin and (c in owned or (c in before.policies) != (c in after.policies))]
    return replaced, [c for c in touched if c not in replaced]


def _jumps_into(t: SavedTable, target: str, skip: set[str]) -> list[tuple[str, Rule]]:
    return [(c, r) for c, rules in t.rules.items() if c not in skip for r in rules if rule_target(r) == target]


def undo_text(before: SavedTable, after: SavedTable, live: SavedTable, owned: Iterable[str], *, cas: bool,
              table: str = TABLE) -> str:
    """The ``iptables-restore --noflush`` input that takes back what one apply changed.

    ``before``: the snapshot; ``after``: what the apply left (``apply_restore`` of its input on
    the snapshot); ``live``: the table now; ``owned``: the chains the apply rewrote whole. Only
    what ``changed_chains`` names is touched (and built-in policies the apply changed).

    ``cas=True`` (the dead-man switch: unattended, after dn's connection is gone, outside the host
    lock): a compare-and-swap. Every rule the apply left is deleted by its exact text and every
    chain it rewrote is deleted (``-X`` refuses a chain that still holds a rule or is still jumped
    to) before the snapshot's content goes back, and ``iptables-restore`` applies the file as one
    transaction: if anything the apply left has changed since (a later apply rewrote it or built
    on it, another tenant's hook landed in a chain it created), the file fails as a whole and
    nothing is undone. ``live`` must then be ``after``. ``cas=False`` (dn's own rollback, under the
    host lock, right after reading ``live``): the touched chains are brought back from whatever
    they hold now.
    """
    builtin = BUILTIN_CHAINS.get(table, frozenset())
    if cas:
        live = after
    replaced, delta = changed_chains(before, after, owned, table)
    rset = set(replaced)

    def exists(t: SavedTable, c: str) -> bool:
        return c in t.policies

    head = [f"*{table}"]
    head += [f":{c} {before.policies[c]} [0:0]" for c in sorted(builtin)
             if before.policies.get(c) and after.policies.get(c) != before.policies[c]]
    drop: list[str] = []
    add: list[str] = []
    # Without the compare-and-swap, a chain that is there and was there is rewritten in place
    # (flushed, refilled), so the jumps into it keep their places; with it, it is deleted (the
    # check) and made again, and the jumps into it go back at the top, where dn keeps its hooks.
    in_place = {x for x in replaced if not cas and exists(live, x) and exists(before, x)}
    remade = [x for x in replaced if x not in in_place]
    # 1. what the apply left goes: jumps into the rewritten chains, the rules it added elsewhere,
    #    the rewritten chains themselves
    for x in remade:
        if exists(live, x):
            drop += [format_rule("-D", c, r) for c, r in _jumps_into(live, x, rset)]
    for x in sorted(in_place):
        extra = Counter(_jumps_into(live, x, rset)) - Counter(_jumps_into(before, x, rset))
        drop += [format_rule("-D", c, r) for (c, r), k in extra.items() for _ in range(k)]
    for d in delta:
        added = Counter(after.chain(d)) - Counter(before.chain(d))
        for r in dict.fromkeys(after.chain(d)):
            if rule_target(r) in rset:
                continue  # handled with the chain it jumps into
            k = added[r] if cas else min(added[r], live.count(d, r))
            drop += [format_rule("-D", d, r)] * k
    for x in replaced:
        if exists(live, x):
            drop += [format_rule("-D", x, r) for r in live.chain(x)] if cas else [f"-F {x}"]
    drop += [f"-X {x}" for x in remade if exists(live, x)]
    # 2. what the snapshot held comes back
    add += [f"-N {x}" for x in remade if exists(before, x)]
    for x in replaced:
        add += [format_rule("-A", x, r) for r in before.chain(x)]
    for d in delta:
        rules = before.chain(d)
        deleted = Counter(rules) - Counter(after.chain(d))
        if not cas:
            deleted = Counter({r: max(0, rules.count(r) - live.count(d, r)) for r in deleted})
        marks = [False] * len(rules)
        for i in reversed(range(len(rules))):
            if deleted[rules[i]] > 0 and rule_target(rules[i]) not in rset:
                marks[i] = True
                deleted[rules[i]] -= 1
        j = len(rules)
        while j and marks[j - 1]:
            j -= 1
        # a rule from the end of the chain goes back at the end (a tail), any other at the top (a hook)
        add += [format_rule("-I", d, ("1",) + rules[i]) for i in reversed(range(j)) if marks[i]]
        add += [format_rule("-A", d, rules[i]) for i in range(j, len(rules))]
    for x in remade:
        if exists(before, x):
            add += [format_rule("-I", c, ("1",) + r) for c, r in reversed(_jumps_into(before, x, rset))]
    for x in sorted(in_place):
        missing = Counter(_jumps_into(before, x, rset)) - Counter(_jumps_into(live, x, rset))
        add += [format_rule("-I", c, ("1",) + r) for (c, r), k in missing.items() for _ in range(k)]
    return "\n".join([*head, *drop, *add, "COMMIT"]) + "\n"


def undo_problems(before: SavedTable, after: SavedTable, now: SavedTable, owned: Iterable[str],
                  table: str = TABLE) -> list[str]:
    """How ``now`` differs from ``before`` in what the apply from ``before`` to ``after`` changed;
    empty when an undo is complete."""
    builtin = BUILTIN_CHAINS.get(table, frozenset())
    replaced, delta = changed_chains(before, after, owned, table)
    rset = set(replaced)
    out = [f"{c}: policy {now.policies.get(c)}, expected {before.policies[c]}" for c in sorted(builtin)
           if before.policies.get(c) and after.policies.get(c) != before.policies[c]
           and now.policies.get(c) != before.policies[c]]
    for x in replaced:
        if (x in now.policies) != (x in before.policies) or now.chain(x) != before.chain(x):
            out.append(f"{x}: not back to its earlier rules")
        if Counter(_jumps_into(now, x, rset)) != Counter(_jumps_into(before, x, rset)):
            out.append(f"jumps into {x}: not as before")
    for d in delta:
        for r in dict.fromkeys([*before.chain(d), *after.chain(d)]):
            if rule_target(r) not in rset and before.count(d, r) != after.count(d, r) and now.count(d, r) != before.count(d, r):
                out.append(f"{d}: '{' '.join(r)}' present {now.count(d, r)} times, expected {before.count(d, r)}")
    return out


# --------------------------------------------------------------------------- tenant bridges closed by default


def _stops(rule: Sequence[str]) -> bool:
    return rule_target(rule) in ("DROP", "REJECT")


def _entered_first(t: SavedTable, chain: str, target: str) -> str | None:
    """None if ``chain`` jumps to ``target`` with nothing but drops before it; else why not."""
    for rule in t.chain(chain):
        if rule_target(rule) == target and rule == ("-j", target):
            return None
        if not _stops(rule):
            return f"{chain}: '{' '.join(rule)}' comes before the jump to {target}"
    return f"{chain}: no unconditional jump to {target}"


def default_closed_findings(v4: SavedTable, v6: SavedTable) -> tuple[list[str], list[str]]:
    """(failures, evidence): whether traffic from a tenant bridge (``dnt+``) that no tenant chain
    explicitly allows is dropped, read from the live rules. IPv4 forwarding: FORWARD enters
    DOCKER-USER before anything else can accept (Docker keeps it first), DOCKER-USER enters
    DN-TENANTS-FWD first, DN-TENANTS-FWD holds nothing but drops and one goto per named bridge
    into that tenant's chain, and ends in the drop for ``dnt+``: a bridge without its chain
    forwards nothing. IPv4 to the host: DN-INPUT drops ``dnt+`` right after DN-TENANTS-IN, which
    holds only per-bridge jumps. IPv6: FORWARD and INPUT drop ``dnt+`` first thing."""
    fails: list[str] = []
    ev: list[str] = []
    bridges = f"{BRIDGE_PREFIX}+"
    if v4.policies.get("FORWARD") != "DROP":
        fails.append(f"IPv4 FORWARD policy is {v4.policies.get('FORWARD')}, not DROP")
    docker = any(r == ("-j", "DOCKER-USER") for r in v4.chain("FORWARD"))
    if not docker:
        if any(not _stops(r) for r in v4.chain("FORWARD")):
            fails.append("IPv4 FORWARD forwards without entering DOCKER-USER")
        else:
            ev.append("IPv4 FORWARD forwards nothing (Docker's rules are not loaded)")
    else:
        fails += [w for w in (_entered_first(v4, "FORWARD", "DOCKER-USER"),
                              _entered_first(v4, "DOCKER-USER", TENANTS_FWD)) if w]
    fwd = v4.chain(TENANTS_FWD)
    if TENANTS_FWD not in v4.policies:
        fails.append(f"IPv4 {TENANTS_FWD} does not exist")
    elif not fwd or fwd[-1] != TENANTS_DEFAULT_DROP:
        fails.append(f"IPv4 {TENANTS_FWD} does not end in the drop for {bridges} (a tenant bridge without its chain "
                     "would forward unfiltered)")
    hooked = []
    for rule in fwd[:-1]:
        iface = rule[1] if len(rule) == 4 and rule[0] == "-i" and rule[2] == "-g" else None
        if _stops(rule):
            continue
        if iface and not iface.endswith("+") and rule[3] in v4.policies:
            hooked.append(iface)
            continue
        fails.append(f"IPv4 {TENANTS_FWD}: '{' '.join(rule)}' is neither a drop nor one bridge's goto into its chain")
    dn_input = v4.chain("DN-INPUT")
    dispatch = ("-i", bridges, "-j", TENANTS_IN)
    if dispatch not in dn_input or dn_input.index(dispatch) + 1 >= len(dn_input) or not (
            dn_input[dn_input.index(dispatch) + 1][:2] == ("-i", bridges) and _stops(dn_input[dn_input.index(dispatch) + 1])):
        fails.append(f"IPv4 DN-INPUT does not drop {bridges} right after {TENANTS_IN}")
    w = _entered_first(v4, "INPUT", "DN-INPUT")
    if w:
        fails.append("IPv4 " + w)
    for rule in v4.chain(TENANTS_IN):
        if not (_stops(rule) or (len(rule) == 4 and rule[0] == "-i" and not rule[1].endswith("+") and rule[2] == "-j")):
            fails.append(f"IPv4 {TENANTS_IN}: '{' '.join(rule)}' is neither a drop nor one bridge's jump into its chain")
    for chain, first in (("FORWARD", "DN-FORWARD"), ("INPUT", "DN-INPUT")):
        w = _entered_first(v6, chain, first)
        if w:
            fails.append("IPv6 " + w)
        elif not any(r[:2] == ("-i", bridges) and _stops(r) for r in v6.chain(first)):
            fails.append(f"IPv6 {first} does not drop {bridges}")
    if v6.policies.get("FORWARD") != "DROP":
        fails.append(f"IPv6 FORWARD policy is {v6.policies.get('FORWARD')}, not DROP")
    if not fails:
        gotos = f"{len(hooked)} tenant bridge goto{'' if len(hooked) == 1 else 's'}"
        ev.append(f"IPv4: {'FORWARD → DOCKER-USER → ' + TENANTS_FWD + ' first; ' if docker else ''}{TENANTS_FWD} ends in "
                  f"'{' '.join(TENANTS_DEFAULT_DROP)}' after {gotos}"
                  f"{' (' + ', '.join(hooked) + ')' if hooked else ''}; DN-INPUT drops {bridges} after {TENANTS_IN}")
        ev.append(f"IPv6: DN-FORWARD and DN-INPUT drop {bridges} first")
    return fails, ev
