"""dn verify's core: the claims, the result model, the runner, the evidence history, the renderers.

Pure apart from the evidence files: checks themselves live in sibling modules and receive a
Probe (the adapters they may use). Each check maps to one technical claim of the trust page and
returns PASS, FAIL or UNKNOWN (could not look: the reason is the evidence) with trimmed evidence:
the facts read, never a secret, never personal data.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterable

from dn.errors import DnError, ExitCode, InvalidInput

EVIDENCE_LIMIT = 40  # lines of evidence kept per check


class Status(str, Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    UNKNOWN = "UNKNOWN"


@dataclass
class Result:
    id: str
    claim: str
    method: str
    status: Status
    evidence: list[str] = field(default_factory=list)
    reason: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        return d


@dataclass(frozen=True)
class Claim:
    """One technical claim of the trust page and how dn checks it."""

    id: str
    claim: str  # the trust page's words
    method: str  # how the check establishes it
    fn: Callable[[Any], tuple[Status, list[str]]]  # (probe) -> (status, evidence)


class Unknown(Exception):
    """Raised by a check that could not look (the message is the reason, without secrets).

    ``evidence`` keeps what the check did see before it had to stop (trimmed like any evidence).
    """

    def __init__(self, reason: str, evidence: Iterable[str] = ()) -> None:
        super().__init__(reason)
        self.evidence = list(evidence)


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 backup``, ``2 backups`` (``words`` for irregular plurals)."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


def trim(lines: Iterable[str], limit: int = EVIDENCE_LIMIT) -> list[str]:
    out = [str(x)[:300] for x in lines]
    if len(out) > limit:
        out = out[:limit] + [f"... {len(out) - limit} more lines"]
    return out


def select(claims: list[Claim], only: str | Iterable[str] | None = None) -> list[Claim]:
    """The claims to run: all, or those named (``--check``), in the claims' own order.

    Unknown ids are refused (InvalidInput naming ``--check`` and the known ids)."""
    if only is None:
        return list(claims)
    wanted = [only] if isinstance(only, str) else list(only)
    if not wanted:
        return list(claims)
    known = [c.id for c in claims]
    for w in wanted:
        if w not in known:
            raise InvalidInput("--check", f"no check {w!r}; known: {', '.join(known)}")
    return [c for c in claims if c.id in wanted]


def run_checks(claims: list[Claim], probe: Any, only: str | Iterable[str] | None = None,
               on_result: Callable[[Result], None] | None = None) -> list[Result]:
    """Run the (selected) checks in order; a check that cannot look is UNKNOWN with its reason.

    A check never stops the run: a DnError or any unexpected exception becomes UNKNOWN with a
    one-line reason (no traceback, trimmed), and the next check runs.
    """
    results = []
    for c in select(claims, only):
        t = time.monotonic()
        try:
            status, evidence = c.fn(probe)
            r = Result(c.id, c.claim, c.method, status, trim(evidence))
        except Unknown as e:
            r = Result(c.id, c.claim, c.method, Status.UNKNOWN, trim(e.evidence), reason=str(e)[:300])
        except DnError as e:
            r = Result(c.id, c.claim, c.method, Status.UNKNOWN, [], reason=str(e)[:300])
        except Exception as e:  # one broken check must not hide the others' evidence
            first = (str(e).splitlines() or [""])[0][:200]
            r = Result(c.id, c.claim, c.method, Status.UNKNOWN, [],
                       reason=f"unexpected error in the check: {type(e).__name__}: {first}")
        r.seconds = round(time.monotonic() - t, 3)
        results.append(r)
        if on_result is not None:
            on_result(r)
    return results


def exit_code(results: list[Result]) -> int:
    """0 when every check passed, 4 when any failed, 1 when none failed but some could not look."""
    if any(r.status is Status.FAIL for r in results):
        return int(ExitCode.POLICY)
    if any(r.status is Status.UNKNOWN for r in results):
        return int(ExitCode.FAILED)
    return int(ExitCode.OK)


# -- evidence history -------------------------------------------------------------------------

def evidence_dir(data_dir: Path) -> Path:
    p = data_dir / "evidence"
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    return p


def record(data_dir: Path, host: str, results: list[Result], now: datetime | None = None) -> Path:
    """Keep this run's evidence (one JSON file per run; written atomically)."""
    now = now or datetime.now(timezone.utc)
    doc = {"time": now.isoformat(), "host": host, "results": [r.to_dict() for r in results]}
    d = evidence_dir(data_dir)
    path = d / f"{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{host}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def history(data_dir: Path) -> list[dict]:
    runs = []
    for p in sorted(evidence_dir(data_dir).glob("*.json")):
        try:
            runs.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return runs


def last_passed(runs: list[dict]) -> dict[str, dict]:
    """Per check id: when it last ran, its last status, and when it last passed."""
    out: dict[str, dict] = {}
    for run in runs:
        for r in run["results"]:
            e = out.setdefault(r["id"], {"id": r["id"], "claim": r["claim"], "last_run": None,
                                         "last_status": None, "last_pass": None, "host": run["host"]})
            e["last_run"], e["last_status"], e["host"] = run["time"], r["status"], run["host"]
            if r["status"] == Status.PASS.value:
                e["last_pass"] = run["time"]
    return out


# -- renderers ----------------------------------------------------------------------------------

def to_json(results: list[Result], host: str) -> dict:
    return {"host": host, "ok": exit_code(results) == 0,
            "counts": {s.value: sum(r.status is s for r in results) for s in Status},
            "results": [r.to_dict() for r in results]}


def to_markdown(results: list[Result], host: str, when: datetime | None = None) -> str:
    when = when or datetime.now(timezone.utc)
    icon = {Status.PASS: "PASS", Status.FAIL: "**FAIL**", Status.UNKNOWN: "UNKNOWN"}
    lines = [f"# dn verify — {host}, {when.strftime('%Y-%m-%d %H:%M UTC')}", "",
             "| check | claim | result |", "|---|---|---|"]
    for r in results:
        lines.append(f"| `{r.id}` | {r.claim} | {icon[r.status]} |")
    lines.append("")
    for r in results:
        lines += [f"## {r.id}: {r.status.value}", "", f"*Claim:* {r.claim}  ", f"*Method:* {r.method}", ""]
        if r.reason:
            lines += [f"*Reason:* {r.reason}", ""]
        if r.evidence:
            lines += ["```", *r.evidence, "```", ""]
    return "\n".join(lines)
