"""What a change to dn's stacks would do: engine events -> a preview model -> text, markdown, JSON.

Pure: no pulumi, typer or rich here. Input is the engine's event stream as plain data
(``dn.engine.event_dict`` of each event), so recorded streams and live ones are read the same way.

The model (:class:`Preview`) has, per stack, one :class:`Step` per resource with its operation
(create, update, replace, delete, same, ...), its *kind* (network, container, volume, firewall,
nginx, timer, ...) and the properties that change. Docker resources come with the engine's
detailed diff; dn's dynamic resources (nginx, iptables, LUKS, systemd) do not, so their changed
properties are computed here from the step's old and new inputs. Secret values arrive masked by
the engine and are only ever shown as ``[secret]``.

From the steps the model derives what a reviewer must see first:

- deletes and replacements of *stateful* resources (volumes and networks: data or addresses are
  lost) — listed before anything else;
- *compliance-relevant* changes, each with a flag: a new public port, a firewall change, a
  network change, a volume replacement or deletion, a changed backup schedule or retention, a
  changed rate limit, a changed TLS/HSTS setting;
- the policy pack's results (mandatory violations make ``dn preview`` exit 4).

Renderers: :func:`render_text` (terminal), :func:`render_markdown` (the pull-request comment:
per-stack counts, stateful and compliance sections, policy results, full details collapsed in
``<details>``, kept under GitHub's 65,536-character limit with an explicit truncation notice),
:func:`to_json` (everything, never truncated).

Exit codes of ``dn preview`` (see :func:`exit_code`): 0 with ``"changed": false`` when nothing
would change; 0 with ``"changed": true`` (and "changes" in the first line) when something would;
4 when a mandatory policy is violated; 1 when a stack's preview failed.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dn.errors import ExitCode

GITHUB_COMMENT_LIMIT = 65_536
# Room kept below the limit for the truncation notice and GitHub's own wrapping.
MARKDOWN_BUDGET = GITHUB_COMMENT_LIMIT - 1_536
MARKER = "<!-- dn-preview -->"  # finds the one comment to update on a pull request
SECRET = "[secret]"
SECRET_SIG = "4dabf18193072939515e22adb298388d"  # Pulumi's marker key of a secret value
VALUE_LIMIT = 160  # characters of one old/new value shown in details
LIST_LIMIT = 40  # entries of the stateful / compliance / policy lists before "... and N more"

# Operations, as the engine names them, and how they are counted. A replacement shows up as up to
# three steps for one URN (replace, create-replacement, delete-replaced): counted once.
COUNTED = ("create", "update", "replace", "delete")
_OP_GROUP = {
    "create": "create",
    "update": "update",
    "replace": "replace",
    "create-replacement": "replace",
    "delete-replaced": "replace",
    "discard-replaced": "replace",
    "delete": "delete",
    "discard": "delete",
    "same": "same",
    "read": "read",
    "read-replacement": "read",
    "refresh": "same",
    "import": "create",
    "import-replacement": "replace",
    "remove-pending-replace": "same",
}
_OP_RANK = {"replace": 0, "delete": 1, "create": 2, "update": 3, "read": 4, "same": 5}

# ---------------------------------------------------------------------------------------------
# kinds: what a resource is, from its type or (for dn's dynamic resources) its name

KINDS = ("network", "container", "volume", "firewall", "nginx", "timer", "directory", "provider", "image",
         "component", "other")
STATEFUL = frozenset({"network", "volume"})

_TYPE_KINDS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^docker:index/network:Network$"), "network"),
    (re.compile(r"^docker:index/container:Container$"), "container"),
    (re.compile(r"^docker:index/volume:Volume$"), "volume"),
    (re.compile(r"^docker:index/(remoteImage|image):"), "image"),
    (re.compile(r"^pulumi:providers:"), "provider"),
    (re.compile(r"^dn:"), "component"),
    # dynamic providers that name their type (``Resource, module=..., name=...``)
    (re.compile(r"^pulumi-python:dynamic.*:.*(?i:vhost|nginx)"), "nginx"),
    (re.compile(r"^pulumi-python:dynamic.*:.*(?i:firewall|iptables|chain)"), "firewall"),
    (re.compile(r"^pulumi-python:dynamic.*:.*(?i:luks|volume)"), "volume"),
    (re.compile(r"^pulumi-python:dynamic.*:.*(?i:timer|systemd|unit)"), "timer"),
    (re.compile(r"^pulumi-python:dynamic.*:.*(?i:director)"), "directory"),
)

# dn's stacks name every resource ``<owner>-<suffix>``; the suffix says what it is (see
# :func:`resource_name`), which is all a generic dynamic resource type leaves to go by.
NAME_SUFFIXES: Mapping[str, str] = {
    "network": "network",
    "tagging": "container",
    "preview": "container",
    "docker": "provider",
    "luks-volume": "volume",
    "firewall": "firewall",
    "firewall-baseline": "firewall",
    "nginx-vhost": "nginx",
    "nginx-base": "nginx",
    "backup-timer": "timer",
    "timer": "timer",
    "dirs": "directory",
}


def resource_name(owner: str, suffix: str, unit: str | None = None) -> str:
    """The Pulumi name of one of dn's resources: ``<owner>-<suffix>`` (``acme-nginx-vhost``), or
    ``<owner>-timer-<unit>`` for a host timer. The preview reads the kind back from it."""
    if suffix not in NAME_SUFFIXES:
        raise ValueError(f"unknown resource suffix {suffix!r}")
    return f"{owner}-{suffix}-{unit}" if unit else f"{owner}-{suffix}"


def kind_of(type_: str, name: str) -> str:
    for rx, kind in _TYPE_KINDS:
        if rx.search(type_):
            return kind
    for suffix in sorted(NAME_SUFFIXES, key=len, reverse=True):
        if name.endswith("-" + suffix) or f"-{suffix}-" in name:
            return NAME_SUFFIXES[suffix]
    return "other"


# ---------------------------------------------------------------------------------------------
# the model


@dataclass
class Change:
    """One changed property: ``path`` (``labels[0].value``), how (add, update, delete) and the
    old/new values as shown (secrets masked, long values cut)."""

    path: str
    how: str
    old: Any = None
    new: Any = None
    replaces: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "how": self.how, "old": self.old, "new": self.new, "replaces": self.replaces}


@dataclass
class Step:
    stack: str
    op: str  # create / update / replace / delete / same / read
    urn: str
    type: str
    name: str
    kind: str
    changes: list[Change] = field(default_factory=list)
    replace_keys: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    detail_source: str = "engine"  # "engine" (detailed diff) or "inputs" (diffed here)

    @property
    def stateful(self) -> bool:
        return self.kind in STATEFUL

    @property
    def changed(self) -> bool:
        return self.op in COUNTED

    def title(self) -> str:
        return f"{self.op} {self.kind} {self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "stack": self.stack, "op": self.op, "urn": self.urn, "type": self.type, "name": self.name,
            "kind": self.kind, "stateful": self.stateful, "flags": list(self.flags),
            "replace_keys": list(self.replace_keys), "detail_source": self.detail_source,
            "changes": [c.to_dict() for c in self.changes],
        }


@dataclass
class PolicyResult:
    stack: str
    policy: str
    pack: str
    level: str  # mandatory / advisory / disabled / remediate
    message: str
    urn: str | None = None

    @property
    def violation(self) -> bool:
        return self.level == "mandatory"

    @property
    def resource(self) -> str:
        return self.urn.rsplit("::", 1)[-1] if self.urn else "(stack)"

    def to_dict(self) -> dict[str, Any]:
        return {"stack": self.stack, "policy": self.policy, "pack": self.pack, "level": self.level,
                "message": self.message, "urn": self.urn}


@dataclass
class StackPreview:
    stack: str
    steps: list[Step] = field(default_factory=list)
    policies: list[PolicyResult] = field(default_factory=list)
    error: str | None = None
    policy_packs: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        out = {k: 0 for k in (*COUNTED, "same")}
        for s in self.steps:
            if s.op in out:
                out[s.op] += 1
        return out

    @property
    def changed(self) -> int:
        return sum(1 for s in self.steps if s.changed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stack": self.stack, "counts": self.counts, "changed": self.changed, "error": self.error,
            "policy_packs": self.policy_packs,
            "steps": [s.to_dict() for s in self.steps if s.changed],
            "unchanged": sorted(s.name for s in self.steps if not s.changed),
            "policies": [p.to_dict() for p in self.policies],
        }


@dataclass
class Preview:
    stacks: list[StackPreview] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(s.changed for s in self.stacks)

    @property
    def violations(self) -> list[PolicyResult]:
        return [p for s in self.stacks for p in s.policies if p.violation]

    @property
    def errors(self) -> list[StackPreview]:
        return [s for s in self.stacks if s.error]

    def steps(self) -> list[Step]:
        return [st for s in self.stacks for st in s.steps if st.changed]

    def stateful(self) -> list[Step]:
        """Deletes and replacements of stateful resources (volumes, networks)."""
        return [s for s in self.steps() if s.stateful and s.op in ("replace", "delete")]

    def compliance(self) -> list[Step]:
        return [s for s in self.steps() if s.flags]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "changed": self.changed,
            "exit_code": int(exit_code(self)),
            "totals": totals(self),
            "stateful": [_ref(s) for s in self.stateful()],
            "compliance": [{**_ref(s), "flags": s.flags} for s in self.compliance()],
            "violations": [p.to_dict() for p in self.violations],
            "stacks": [s.to_dict() for s in self.stacks],
        }


def _ref(s: Step) -> dict[str, Any]:
    return {"stack": s.stack, "op": s.op, "kind": s.kind, "name": s.name, "urn": s.urn}


def totals(p: Preview) -> dict[str, int]:
    out = {k: 0 for k in (*COUNTED, "same")}
    for s in p.stacks:
        for k, v in s.counts.items():
            out[k] += v
    return out


def exit_code(p: Preview) -> ExitCode:
    """1 when a stack could not be previewed, else 4 on a mandatory policy violation, else 0
    (whether anything would change is ``Preview.changed``, "changed" in the JSON)."""
    if p.errors:
        return ExitCode.FAILED
    if p.violations:
        return ExitCode.POLICY
    return ExitCode.OK


# ---------------------------------------------------------------------------------------------
# reading events


def _is_secret(v: Any) -> bool:
    return isinstance(v, Mapping) and (SECRET_SIG in v or v.get("ciphertext") == SECRET)


def shown(v: Any, limit: int = VALUE_LIMIT) -> Any:
    """A value as the preview shows it: secrets masked, long strings cut, nested data kept."""
    if _is_secret(v):
        return SECRET
    if isinstance(v, str):
        return v if len(v) <= limit else v[: limit - 1] + "…"
    if isinstance(v, Mapping):
        return {str(k): shown(x, limit) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [shown(x, limit) for x in v]
    return v


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [1]}}`` -> ``{"a.b[0]": 1}``; secrets and empty containers are leaves (an
    empty top level has no leaves)."""
    out: dict[str, Any] = {}
    if not prefix and isinstance(value, (Mapping, list, tuple)) and not value:
        return out
    if _is_secret(value):
        out[prefix] = SECRET
    elif isinstance(value, Mapping) and value:
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, (list, tuple)) and value:
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix] = value
    return out


def _internal(path: str) -> bool:
    # __provider is the pickled dynamic provider (a secret); its change is not a resource change
    return path.startswith("__")


def diff_inputs(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None,
                replace_keys: Sequence[str] = ()) -> list[Change]:
    """The changed leaf properties between two input maps (for resources without a detailed diff)."""
    a, b = flatten(dict(old or {})), flatten(dict(new or {}))
    out = []
    for path in sorted(set(a) | set(b)):
        if _internal(path):
            continue
        top = re.split(r"[.\[]", path, maxsplit=1)[0]
        rep = top in replace_keys
        if path not in a:
            out.append(Change(path, "add", None, shown(b[path]), rep))
        elif path not in b:
            out.append(Change(path, "delete", shown(a[path]), None, rep))
        elif a[path] != b[path]:
            out.append(Change(path, "update", shown(a[path]), shown(b[path]), rep))
    return out


_PATH_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _lookup(data: Any, path: str) -> Any:
    cur = data
    for m in _PATH_TOKEN.finditer(path):
        key, idx = m.group(1), m.group(2)
        try:
            cur = cur[int(idx)] if idx is not None else cur[key]
        except (KeyError, IndexError, TypeError, ValueError):
            return None
    return cur


def _detailed(meta: Mapping[str, Any]) -> list[Change]:
    dd = meta.get("detailed_diff") or meta.get("detailedDiff") or {}
    old_in = (meta.get("old") or {}).get("inputs") or {}
    new_in = (meta.get("new") or {}).get("inputs") or {}
    out = []
    for path, pd in sorted(dd.items()):
        if _internal(path):
            continue
        kind = str((pd or {}).get("diff_kind") or (pd or {}).get("kind") or "update")
        how = kind.replace("-replace", "")
        old, new = _lookup(old_in, path), _lookup(new_in, path)
        out.append(Change(path, how, None if how == "add" else shown(old), None if how == "delete" else shown(new),
                          kind.endswith("-replace")))
    return out


# Which changed paths make a change compliance-relevant, per kind.
_PUBLIC_PORTS = re.compile(r"^(ports(\[|$)|publishAllPorts|publish_all|networkMode$|host\.public_ports)")
_RATE = re.compile(r"^tenant\.limits\.(rate_per_ip|burst_per_ip|rate_per_tenant|burst_per_tenant|conn_per_ip)$")
_TLS = re.compile(r"^host\.(hsts_max_age|cert_dir)$|tls|ssl|hsts|cipher|protocol", re.IGNORECASE)
_ACCESS = re.compile(r"^host\.(admin_sources|ssh_port|public_ports|tenant_host_services|ipv6)")
_SCHEDULE = re.compile(r"^(tenant\.backup_schedule|schedules\.)")


def _unit(step: Step) -> str:
    # timer resources are named <owner>-backup-timer (a tenant's backup) or <host>-timer-<unit>
    if step.name.endswith("-backup-timer"):
        return "dn-backup-tenant"
    return step.name.split("-timer-", 1)[1] if "-timer-" in step.name else ""


def flags_of(step: Step) -> list[str]:
    """The compliance flags of one changed step: a new public port, a firewall or network change,
    a volume replacement or deletion, a backup schedule change or removal, a rate limit or TLS/HSTS
    change. Creating a resource flags only what it opens (a published port, a firewall or
    network); updates flag what their changed paths touch."""
    if not step.changed:
        return []
    flags: list[str] = []

    def add(f: str) -> None:
        if f not in flags:
            flags.append(f)

    paths = [c.path for c in step.changes if c.how != "delete" or step.op == "delete"]
    kind, op = step.kind, step.op
    if kind == "container":
        opened = [c for c in step.changes if _PUBLIC_PORTS.match(c.path) and c.new not in (None, [], {}, False, "bridge")]
        if opened and op != "delete":
            add("public port")
        if op in ("update", "replace") and any(p.startswith(("networks", "network")) for p in paths):
            add("network change")
    elif kind == "firewall":
        add("firewall change")
        if op in ("update", "replace") and any(_ACCESS.match(p) for p in paths):
            if any(p.startswith("host.public_ports") for p in paths):
                add("public port")
            add("host access change")
    elif kind == "network":
        add("network change")
    elif kind == "nginx":
        if op in ("update", "replace"):
            if any(_RATE.match(p) for p in paths):
                add("rate limit change")
            if any(_TLS.search(p) for p in paths):
                add("TLS/HSTS change")
        if op == "delete":
            add("public endpoint removed")
    elif kind == "timer":
        unit = _unit(step)
        backup = unit.startswith("dn-backup-")
        if op in ("update", "replace") and any(_SCHEDULE.match(p) for p in paths):
            add("backup schedule change" if backup else "schedule change")
        if op == "delete" and backup:
            add("backup schedule removed")
    if kind == "volume" and op in ("replace", "delete"):
        add("volume replacement" if op == "replace" else "volume deletion")
    if kind == "network" and op in ("replace", "delete"):
        add("network replacement" if op == "replace" else "network deletion")
    return flags


def _name(urn: str) -> str:
    return urn.rsplit("::", 1)[-1]


def _meta(event: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    ev = event.get(key)
    return ev.get("metadata") if isinstance(ev, Mapping) else None


def _skip(meta: Mapping[str, Any]) -> bool:
    t = str(meta.get("type", ""))
    state = meta.get("new") or meta.get("old") or {}
    if t == "pulumi:pulumi:Stack" or not state.get("custom"):
        return True  # the stack and component resources (dn:tenant:Tenant) only group others
    # default providers are engine plumbing; an explicit provider (the tenant's docker) is not
    return t.startswith("pulumi:providers:") and _name(str(meta.get("urn", ""))).startswith("default")


def stack_from_events(stack: str, events: Iterable[Mapping[str, Any]], *, error: str | None = None,
                      policy_packs: Sequence[str] = ()) -> StackPreview:
    """The preview of one stack from its engine events (``resource_pre_event`` steps, policy
    events, error diagnostics)."""
    sp = StackPreview(stack, error=error, policy_packs=list(policy_packs))
    by_urn: dict[str, Step] = {}
    order: list[str] = []
    seen_policy: set[tuple] = set()
    errors: list[str] = []
    for ev in events:
        meta = _meta(ev, "resource_pre_event")
        if meta is not None and not _skip(meta):
            urn = str(meta.get("urn", ""))
            op = _OP_GROUP.get(str(meta.get("op", "")), str(meta.get("op", "")))
            keys = [str(k) for k in (meta.get("keys") or [])]
            prev = by_urn.get(urn)
            raw = str(meta.get("op", ""))
            if prev is not None and (_OP_RANK.get(prev.op, 9) < _OP_RANK.get(op, 9) or
                                     (prev.op == op and raw != "replace")):
                # a replacement's create-replacement / delete-replaced steps add nothing to the
                # "replace" step, which carries both the old and the new inputs
                if keys and not prev.replace_keys:
                    prev.replace_keys = keys
                continue
            name = _name(urn)
            step = Step(stack, op, urn, str(meta.get("type", "")), name, kind_of(str(meta.get("type", "")), name),
                        replace_keys=keys)
            if meta.get("detailed_diff") or meta.get("detailedDiff"):
                step.changes = _detailed(meta)
            elif op in ("update", "replace"):
                step.changes = diff_inputs((meta.get("old") or {}).get("inputs"), (meta.get("new") or {}).get("inputs"),
                                           keys)
                step.detail_source = "inputs"
            elif op == "create":
                step.changes = diff_inputs({}, (meta.get("new") or {}).get("inputs"))
                step.detail_source = "inputs"
            elif op == "delete":
                step.changes = diff_inputs((meta.get("old") or {}).get("inputs"), {})
                step.detail_source = "inputs"
            if urn not in by_urn:
                order.append(urn)
            by_urn[urn] = step
            continue
        pol = ev.get("policy_event")
        if isinstance(pol, Mapping):
            key = (pol.get("policy_name"), pol.get("resource_urn"), pol.get("message"))
            if key not in seen_policy:
                seen_policy.add(key)
                sp.policies.append(PolicyResult(
                    stack, str(pol.get("policy_name", "?")), str(pol.get("policy_pack_name", "?")),
                    str(pol.get("enforcement_level", "advisory")), _clean_message(str(pol.get("message", ""))),
                    pol.get("resource_urn") or None))
            continue
        diag = ev.get("diagnostic_event")
        if isinstance(diag, Mapping) and diag.get("severity") == "error":
            msg = str(diag.get("message", "")).strip()
            if msg and msg not in errors:
                errors.append(msg)
    for urn in order:
        step = by_urn[urn]
        step.flags = flags_of(step)
        sp.steps.append(step)
    if sp.error is None and errors and not any(x.violation for x in sp.policies):
        sp.error = "\n".join(errors)[:2000]
    return sp


def _clean_message(msg: str) -> str:
    # the engine prefixes the policy's description line; keep description and message, one line
    return re.sub(r"\s*\n\s*", " — ", msg.strip())


def preview_from_events(streams: Mapping[str, Iterable[Mapping[str, Any]]]) -> Preview:
    """A preview of several stacks from ``{stack: events}``."""
    return Preview([stack_from_events(name, evs) for name, evs in streams.items()])


@dataclass
class Drift:
    """A resource whose live state differs from the state dn recorded (from a refresh)."""

    stack: str
    urn: str
    type: str
    name: str
    kind: str
    how: str  # "changed" or "gone"
    changes: list[Change] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"stack": self.stack, "urn": self.urn, "type": self.type, "name": self.name, "kind": self.kind,
                "how": self.how, "changes": [c.to_dict() for c in self.changes]}


def drift_from_events(stack: str, events: Iterable[Mapping[str, Any]]) -> list[Drift]:
    """What a refresh found changed or gone on the host, from its ``res_outputs_event`` steps:
    the recorded outputs (old) against what the providers read back (new)."""
    out: dict[str, Drift] = {}
    refreshed: set[str] = set()  # a preview's planned updates are no drift: only refresh steps count
    for ev in events:
        pre = _meta(ev, "resource_pre_event")
        if pre is not None and pre.get("op") == "refresh":
            refreshed.add(str(pre.get("urn", "")))
        meta = _meta(ev, "res_outputs_event")
        if meta is None or _skip(meta) or str(meta.get("urn", "")) not in refreshed:
            continue
        op = str(meta.get("op", ""))
        if op not in ("update", "delete"):
            continue
        urn = str(meta.get("urn", ""))
        name = _name(urn)
        old = (meta.get("old") or {}).get("outputs")
        new = (meta.get("new") or {}).get("outputs")
        how = "gone" if op == "delete" or not meta.get("new") else "changed"
        changes = diff_inputs(old, {} if how == "gone" else new)
        out[urn] = Drift(stack, urn, str(meta.get("type", "")), name, kind_of(str(meta.get("type", "")), name), how,
                         changes)
    return list(out.values())


# ---------------------------------------------------------------------------------------------
# rendering

_OP_SIGN = {"create": "+", "update": "~", "replace": "+-", "delete": "-", "same": " ", "read": ">"}


def _fmt(v: Any) -> str:
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    return json.dumps(v, ensure_ascii=False, sort_keys=True, default=str)


def _change_line(c: Change) -> str:
    rep = "  (forces replacement)" if c.replaces else ""
    if c.how == "add":
        return f"    + {c.path}: {_fmt(c.new)}{rep}"
    if c.how == "delete":
        return f"    - {c.path}: {_fmt(c.old)}{rep}"
    return f"    ~ {c.path}: {_fmt(c.old)} => {_fmt(c.new)}{rep}"


# Inputs every host resource carries (where and how to reach the host, the host's baseline and
# schedules): on a create or delete they say nothing about the resource itself, so the text and
# markdown details leave them out (JSON keeps everything); on an update they are shown.
CONTEXT_PREFIXES = ("ssh.", "host.", "schedules.")


def step_lines(s: Step) -> list[str]:
    head = f"{_OP_SIGN.get(s.op, '?'):>2} {s.op:7} {s.kind:9} {s.name}  ({s.type})"
    if s.replace_keys:
        head += f"  replace because: {', '.join(s.replace_keys)}"
    if s.flags:
        head += f"  [{'; '.join(s.flags)}]"
    lines = [head]
    if s.op == "update" and not s.changes:
        lines.append("    (only secret or provider-internal values differ)")
    changes = s.changes
    if s.op in ("create", "delete"):
        changes = [c for c in s.changes if not c.path.startswith(CONTEXT_PREFIXES) or c.path == "host.name"]
        if len(changes) < len(s.changes):
            lines.append(f"    ({len(s.changes) - len(changes)} host, ssh and schedule inputs not shown)")
    lines += [_change_line(c) for c in changes]
    return lines


def headline(p: Preview) -> str:
    t = totals(p)
    code = exit_code(p)
    if code == ExitCode.FAILED:
        state = "error"
    elif code == ExitCode.POLICY:
        state = "policy violation"
    elif p.changed:
        state = "changes"
    else:
        state = "no changes"
    nums = ", ".join(f"{t[k]} to {k}" for k in COUNTED)
    return f"{state}: {nums} ({len(p.stacks)} stack{'s' if len(p.stacks) != 1 else ''})"


def _bounded(items: list[str], limit: int = LIST_LIMIT) -> list[str]:
    if len(items) <= limit:
        return items
    return items[:limit] + [f"... and {len(items) - limit} more (see --format json)"]


def render_text(p: Preview) -> str:
    """The preview for a terminal: headline, per-stack counts, stateful and compliance lists,
    policy results, then every change."""
    out = [headline(p), ""]
    for s in p.stacks:
        c = s.counts
        line = f"{s.stack:24} " + "  ".join(f"{k} {c[k]}" for k in (*COUNTED, "same"))
        out.append(line + (f"  ERROR: {s.error.splitlines()[0]}" if s.error else ""))
    if p.stateful():
        out += ["", "Stateful resources deleted or replaced (data or addresses are lost):"]
        out += _bounded([f"  {s.stack}: {s.op} {s.kind} {s.name}" for s in p.stateful()])
    if p.compliance():
        out += ["", "Compliance-relevant changes:"]
        out += _bounded([f"  {s.stack}: {s.op} {s.kind} {s.name}: {'; '.join(s.flags)}" for s in p.compliance()])
    pols = [x for s in p.stacks for x in s.policies]
    if pols or any(s.policy_packs for s in p.stacks):
        out += ["", "Policies:"]
        out += _bounded([f"  {'VIOLATION' if x.violation else x.level}: {x.policy} ({x.stack} {x.resource}): {x.message}"
                         for x in pols]) or ["  all policies passed"]
    for s in p.stacks:
        if not s.changed and not s.error:
            continue
        out += ["", f"== {s.stack}"]
        if s.error:
            out += [f"  error: {ln}" for ln in s.error.splitlines()]
        for st in s.steps:
            if st.changed:
                out += step_lines(st)
    return "\n".join(out) + "\n"


def _md_escape(text: str) -> str:
    return re.sub(r"([\\`*_{}\[\]<>|])", r"\\\1", text)


def _md_code(text: str) -> str:
    return "`" + text.replace("`", "'") + "`"


def render_markdown(p: Preview, *, budget: int = MARKDOWN_BUDGET, title: str = "dn preview") -> str:
    """The pull-request comment. Everything above the details is always kept (lists bounded); the
    per-stack details are added while they fit ``budget``, and what did not fit is named in an
    explicit truncation notice. The result is always shorter than GitHub's 65,536 characters."""
    code = exit_code(p)
    icon = {ExitCode.OK: "✅", ExitCode.POLICY: "⛔", ExitCode.FAILED: "❌"}[code]
    head = [MARKER, f"## {icon} {title}: {headline(p)}", ""]
    head += ["| stack | create | update | replace | delete | same | policy |", "|---|---:|---:|---:|---:|---:|---|"]
    for s in p.stacks:
        c = s.counts
        v = [x for x in s.policies if x.violation]
        pol = (f"⛔ {len(v)} violation{'s' if len(v) != 1 else ''}" if v
               else ("❌ error" if s.error else ("✅ passed" if s.policy_packs else "—")))
        head.append(f"| {_md_code(s.stack)} | {c['create']} | {c['update']} | {c['replace']} | {c['delete']} | "
                    f"{c['same']} | {pol} |")
    if p.stateful():
        head += ["", "### ⚠️ Stateful resources deleted or replaced", ""]
        head += _bounded([f"- **{s.op}** {s.kind} {_md_code(s.name)} in {_md_code(s.stack)}"
                          + (f" (because: {', '.join(_md_code(k) for k in s.replace_keys)})" if s.replace_keys else "")
                          for s in p.stateful()])
    if p.compliance():
        head += ["", "### 🔎 Compliance-relevant changes", ""]
        head += _bounded([f"- {_md_code(s.stack)} {s.op} {s.kind} {_md_code(s.name)}: **{'; '.join(s.flags)}**"
                          for s in p.compliance()])
    pols = [x for s in p.stacks for x in s.policies]
    if pols or any(s.policy_packs for s in p.stacks):
        head += ["", "### Policy results", ""]
        head += _bounded([f"- {'⛔ **mandatory**' if x.violation else x.level} {_md_code(x.policy)} on "
                          f"{_md_code(x.stack)} {_md_code(x.resource)}: {_md_escape(x.message)}" for x in pols]) \
            or ["- ✅ every policy passed"]
    errs = [s for s in p.stacks if s.error]
    if errs:
        head += ["", "### ❌ Errors", ""]
        for s in errs:
            head.append(f"- {_md_code(s.stack)}: {_md_escape(s.error.splitlines()[0][:300])}")
    text = "\n".join(head) + "\n"

    blocks: list[tuple[str, list[str], str]] = []
    for s in p.stacks:
        if not s.changed:
            continue
        body = [ln for st in s.steps if st.changed for ln in step_lines(st)]
        fence = "````" if any("```" in ln for ln in body) else "```"
        summary = (f"<details><summary>Details: {_md_escape(s.stack)} ({s.changed} change"
                   f"{'s' if s.changed != 1 else ''})</summary>")
        blocks.append((s.stack, ["", summary, "", fence + "diff", *body], fence))

    def close(fence: str) -> str:
        return f"{fence}\n\n</details>\n"

    omitted: list[str] = []
    for i, (name, lines, fence) in enumerate(blocks):
        block = "\n".join(lines) + "\n" + close(fence)
        if len(text) + len(block) <= budget:
            text += block
            continue
        omitted = [n for n, _, _ in blocks[i:]]
        # as much of the first stack that does not fit as there is room for, cut at a line
        room = budget - len(text) - 600
        if room > 1000:
            part: list[str] = []
            used = 0
            for ln in lines:
                if used + len(ln) + 1 > room:
                    break
                part.append(ln)
                used += len(ln) + 1
            text += "\n".join(part) + "\n... (cut here: see the truncation note)\n" + close(fence)
        break
    if omitted:
        text += (f"\n> **Truncated:** the details of {len(omitted)} stack{'s' if len(omitted) != 1 else ''} "
                 f"({', '.join(omitted[:20])}{', ...' if len(omitted) > 20 else ''}) did not fit GitHub's "
                 f"{GITHUB_COMMENT_LIMIT:,}-character comment limit. The counts, stateful, compliance and policy "
                 "sections above are complete; run `dn preview --all --format json` for every detail.\n")
    if len(text) >= GITHUB_COMMENT_LIMIT:  # bounded lists keep the head small; this is the last guard
        cut = text[: GITHUB_COMMENT_LIMIT - 200]
        text = cut.rsplit("\n", 1)[0] + "\n\n> **Truncated** at the comment limit.\n"
    return text


def to_json(p: Preview) -> str:
    return json.dumps(p.to_dict(), indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"


def drift_text(drifts: Sequence[Drift]) -> str:
    if not drifts:
        return "no drift: the host matches dn's state\n"
    out = [f"drift: {len(drifts)} resource{'s' if len(drifts) != 1 else ''} changed behind dn's back"]
    for d in drifts:
        out.append(f"  {d.stack}: {d.kind} {d.name} {d.how}")
        out += [_change_line(c) for c in d.changes]
    return "\n".join(out) + "\n"
