"""Plans of host resources: what an apply will change on a host, and why. Pure.

Every applier in ``dn.host`` works in three steps: ``read(session, ...)`` gathers the current
state, the pure ``plan(desired, current)`` lists the changes (an empty plan means the host is
already as desired: nothing is touched, nothing reloaded), and ``apply(session, plan)`` carries
out exactly that plan. ``--dry-run`` and drift reports print the plan.

``Progress`` callbacks receive the name of each step as an apply enters it (``upload``, ``swap``,
``validate``, ``reload`` ...); the CLI shows them, and they let a caller act between steps.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from dn.errors import OperationFailed

Progress = Callable[[str], None]


class ApplyRefused(OperationFailed):
    """The host refused a change (``nginx -t``, a reload, a post-apply check). Raised inside a
    transaction, the previous state is restored before the caller sees it (as ``dn.ssh.CheckFailed``
    wrapping this message)."""


def no_progress(_: str) -> None:
    """A Progress that ignores every step."""


@dataclass(frozen=True)
class Change:
    """One change of a plan: ``action`` on ``target`` because of ``reason``."""

    action: str
    target: str
    reason: str

    def __str__(self) -> str:
        return f"{self.action} {self.target}: {self.reason}"


@dataclass(frozen=True)
class Plan:
    """What an apply will do to one host resource. ``notes`` are facts worth telling (e.g. that
    a volume cannot be opened on this host) that are not changes."""

    resource: str
    changes: tuple[Change, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.changes

    def has(self, action: str) -> bool:
        return any(c.action == action for c in self.changes)

    def targets(self, *actions: str) -> list[str]:
        return [c.target for c in self.changes if c.action in actions]

    def describe(self) -> list[str]:
        """Human-readable lines: one per change (or "no change"), then the notes."""
        lines = [f"{self.resource}: " + (f"{len(self.changes)} change(s)" if self.changes else "no change")]
        lines += [f"  {c}" for c in self.changes]
        lines += [f"  note: {n}" for n in self.notes]
        return lines

    def to_dict(self) -> dict:
        return {
            "resource": self.resource,
            "changes": [{"action": c.action, "target": c.target, "reason": c.reason} for c in self.changes],
            "notes": list(self.notes),
        }


@dataclass
class Applied:
    """The outcome of an apply: the plan carried out and what the host said along the way."""

    plan: Plan
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return not self.plan.empty


def file_changes(desired: Mapping[str, bytes | None], current: Mapping[str, bytes | None]) -> list[Change]:
    """Changes that bring files to ``desired`` (``None``: the file must not exist)."""
    out = []
    for path, want in desired.items():
        have = current.get(path)
        if want is None:
            if have is not None:
                out.append(Change("delete", path, "no longer wanted"))
        elif have is None:
            out.append(Change("create", path, "missing on the host"))
        elif have != want:
            out.append(Change("update", path, "content differs from the rendered configuration"))
    return out


def digest(files: Mapping[str, bytes | None] | Iterable[tuple[str, bytes | None]]) -> str:
    """A stable SHA-256 over paths and contents (``None`` entries count as "absent")."""
    items = sorted(files.items() if isinstance(files, Mapping) else files)
    h = hashlib.sha256(b"dn-files-v1\0")
    for path, data in items:
        h.update(path.encode() + b"\0")
        if data is None:
            h.update(b"-\0")
        else:
            h.update(b"+" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()
