"""The deletion certificate (pure): what was done for a GDPR request, with evidence.

A JSON document (format ``dn-gdpr-certificate/1``): the request, the tenant's identifiers (id,
slug, host — never a name, e-mail or address), every step with its timestamps and result, the
tenant's row counts per table before and after, the LUKS evidence (``cryptsetup luksDump`` after
the erase), the backups affected and the dates they expire anyway, what was retained and why.
Its SHA-256 over the canonical encoding is recorded in the journal and in the audit entry, so
the file can be checked against both.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

FORMAT = "dn-gdpr-certificate/1"


def _ts(t: Any) -> Any:
    if isinstance(t, datetime):
        return t.astimezone(timezone.utc).isoformat(timespec="seconds")
    return t


def canonical(cert: Mapping[str, Any]) -> bytes:
    return json.dumps(cert, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def digest(cert: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the certificate's canonical encoding."""
    return hashlib.sha256(canonical(cert)).hexdigest()


def build(*, request: Mapping[str, Any], tenant: Mapping[str, Any], plan: Mapping[str, Any],
          steps: Sequence[Mapping[str, Any]], counts_after: Mapping[str, int], completed_at: datetime,
          dn_version: str) -> dict[str, Any]:
    """The certificate from the journal: ``plan`` as recorded, ``steps`` in order with their
    results (the disable step's result holds the counts taken once writes were refused)."""
    by_step = {s["step"]: s for s in steps}
    before = dict((by_step.get("disable", {}).get("result") or {}).get("counts") or plan.get("counts") or {})
    actions = {d["table"]: "deleted" for d in plan.get("delete", [])}
    actions.update({r["table"]: ("minimised" if r["action"] == "minimise" else "retained")
                    for r in plan.get("retain", [])})
    counts = {t: {"before": int(before.get(t, 0)), "after": int(counts_after.get(t, 0)), "action": actions.get(t, "kept")}
              for t in sorted(set(before) | set(counts_after))}
    due = request["due_at"]
    backups = (by_step.get("backup-keys", {}).get("result") or {})
    return {
        "format": FORMAT,
        "request_id": request["id"],
        "tenant": {"id": tenant["id"], "slug": tenant["slug"], "host": tenant["host"]},
        "received_at": _ts(request["received_at"]),
        "deadline": _ts(due),
        "completed_at": _ts(completed_at),
        "on_time": completed_at <= due,
        "steps": [{"step": s["step"], "started_at": _ts(s["started_at"]), "finished_at": _ts(s["finished_at"]),
                   "attempts": s["attempts"], "result": s.get("result")} for s in steps],
        "counts": counts,
        "luks": by_step.get("luks", {}).get("result"),
        "stack": by_step.get("stack", {}).get("result"),
        "backups": backups,
        "retained": [{"table": r["table"], "rows": counts.get(r["table"], {}).get("after", 0), "action": r["action"],
                      "minimised": r.get("minimise") or {}, "reason": r["reason"], "kept_for": r.get("kept_for")}
                     for r in plan.get("retain", [])],
        "issued_by": f"dn {dn_version}",
    }


def check(cert: Mapping[str, Any]) -> list[str]:
    """What makes a certificate not a proof of erasure (empty when it is one)."""
    problems = []
    for table, c in (cert.get("counts") or {}).items():
        if c.get("action") == "deleted" and c.get("after"):
            problems.append(f"{table}: {c['after']} row(s) of the tenant remain")
    steps = [s["step"] for s in cert.get("steps", [])]
    for s in ("disable", "luks", "stack", "backup-keys", "rows", "minimise"):
        if s not in steps:
            problems.append(f"step {s} is not recorded")
    return problems


def render_text(cert: Mapping[str, Any], sha256: str | None = None) -> str:
    t = cert["tenant"]
    lines = [
        f"Deletion certificate — request {cert['request_id']}, tenant {t['slug']} (id {t['id']}, host {t['host']})",
        f"received {cert['received_at']}, deadline {cert['deadline']}, completed {cert['completed_at']}"
        f" ({'on time' if cert['on_time'] else 'LATE'})",
    ]
    if sha256:
        lines.append(f"sha256 {sha256}")
    lines.append("steps:")
    for s in cert["steps"]:
        lines.append(f"  {s['step']:<12} {s['started_at']} -> {s['finished_at']}"
                     + (f" (attempts: {s['attempts']})" if s["attempts"] > 1 else "")
                     + (f"  {s['result'].get('summary')}" if isinstance(s.get("result"), dict) and s["result"].get("summary") else ""))
    lines.append("rows (before -> after):")
    for table, c in cert["counts"].items():
        lines.append(f"  {table:<20} {c['before']:>10} -> {c['after']:<10} {c['action']}")
    return "\n".join(lines)
