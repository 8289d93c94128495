"""Helpers shared by the stack commands (dn tenant, dn host, dn up, dn preview, dn refresh):
engine progress on stderr, reading a secret from a file or stdin, printing plans.

Not a noun: nothing here is registered in cli.main.NOUNS.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from dn.context import Context

_VERBS = {"create": "created", "update": "updated", "delete": "deleted", "replace": "replaced",
          "create-replacement": "created (replacement)", "delete-replaced": "deleted (replaced)",
          "refresh": "read back", "same": "unchanged", "read": "read"}


def progress(ctx: "Context", stack: str) -> Callable[[dict], None]:
    """An engine event callback that shows each resource step on stderr as it finishes."""
    err = ctx.err

    def on_event(ev: dict) -> None:
        out = ev.get("res_outputs_event")
        if isinstance(out, dict):
            meta = out.get("metadata") or {}
            if meta.get("type") == "pulumi:pulumi:Stack" or str(meta.get("type", "")).startswith("pulumi:providers:"):
                return
            op = str(meta.get("op", ""))
            if op == "same" or out.get("planning"):
                return
            name = str(meta.get("urn", "")).rsplit("::", 1)[-1]
            err.print(f"  {stack}: {_VERBS.get(op, op)} {name}", soft_wrap=True, markup=False, highlight=False)
            return
        fail = ev.get("res_op_failed_event")
        if isinstance(fail, dict):
            meta = fail.get("metadata") or {}
            name = str(meta.get("urn", "")).rsplit("::", 1)[-1]
            err.print(f"  {stack}: FAILED {meta.get('op', '')} {name}", soft_wrap=True, markup=False, highlight=False)
            return
        diag = ev.get("diagnostic_event")
        if isinstance(diag, dict) and diag.get("severity") in ("error", "warning"):
            msg = str(diag.get("message", "")).strip()
            if msg:
                err.print(f"  {stack}: {diag['severity']}: {msg.splitlines()[0][:300]}", soft_wrap=True,
                          markup=False, highlight=False)

    return on_event


def read_secret(file: Optional[Path], stdin: bool, field: str, flag: str) -> Optional[str]:
    """A secret from ``--<flag>-file F`` or ``--<flag>-stdin`` (never from argv). Trailing
    whitespace and newlines are removed."""
    from dn.errors import InvalidInput

    if file is not None and stdin:
        raise InvalidInput(field, f"give --{flag}-file or --{flag}-stdin, not both")
    if file is not None:
        try:
            data = Path(file).read_text()
        except OSError as e:
            raise InvalidInput(field, f"cannot read {file}: {e.strerror}") from None
        return data.strip()
    if stdin:
        if sys.stdin.isatty():
            import getpass

            return getpass.getpass(f"{field} (not echoed): ").strip()
        return sys.stdin.read().strip()
    return None


def print_plan(ctx: "Context", plan: Any, *, as_json: bool) -> None:
    """A tenant plan (``dn.tenants.Plan``) on stdout."""
    if as_json:
        ctx.out_json(plan.to_dict())
        return
    d = plan.to_dict()
    ctx.out(f"{d['action']} tenant {d['tenant']} on host {d['host']}")
    for k, ch in d["changes"].items():
        ctx.out(f"  change {k}: {ch['from']} -> {ch['to']}")
    for r in d["resources"]:
        rest = ", ".join(f"{k}={v}" for k, v in r.items() if k != "kind")
        ctx.out(f"  {r['kind']:9} {rest}")
