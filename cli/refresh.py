"""dn refresh: find what changed on the hosts behind dn's back (drift)."""
from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(invoke_without_command=True)


@app.callback(invoke_without_command=True)
def refresh(
    ctx: typer.Context,
    tenant: Optional[str] = typer.Option(None, "--tenant", help="one tenant's stack"),
    host: Optional[str] = typer.Option(None, "--host", help="one host's baseline stack"),
    all_: bool = typer.Option(False, "--all", help="every stack (the default)"),
    preview_only: bool = typer.Option(False, "--preview-only", help="report drift without recording it in the state"),
    json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Read every resource of the selected stacks back from its host and report what differs
    from dn's state. The state then records what was found (unless --preview-only), so the next
    `dn up` puts the declared configuration back. Each host's pinned SSH key is verified first.
    Exit 4 when drift is found, 0 when none, 3 when a host cannot be reached or does not present
    its pinned key (the message names the fingerprint it presented)."""
    from dn import preview as pv
    from dn import tenants
    from dn.errors import DriftFound

    c = ctx.obj
    if not (tenant or host):
        all_ = True
    with tenants.connect(c.settings, "refresh") as conn:
        sel = tenants.targets(c.settings, conn, tenant=tenant, host=host, all_=all_)
    drifts = tenants.refresh_targets(c, sel, preview_only=preview_only)
    if json:
        c.out_json({"drift": [d.to_dict() for d in drifts], "stacks": [tenants.stack_name(t) for t in sel]})
    else:
        c.out(pv.drift_text(drifts).rstrip("\n"))
    if drifts:
        raise DriftFound(f"{len(drifts)} resource(s) changed behind dn's back",
                         hint="`dn up` puts the declared configuration back" + (
                             " (rerun without --preview-only first)" if preview_only else ""))
