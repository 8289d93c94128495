"""dn up: apply stacks (one tenant, one host's baseline, or everything)."""
from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(invoke_without_command=True)


@app.callback(invoke_without_command=True)
def up(
    ctx: typer.Context,
    tenant: Optional[str] = typer.Option(None, "--tenant", help="one tenant's stack"),
    host: Optional[str] = typer.Option(None, "--host", help="one host's baseline stack"),
    all_: bool = typer.Option(False, "--all", help="every host baseline, then every tenant"),
    json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Bring stacks to their declared state (the registry and settings), with the policy pack as
    a gate. Each stack is audited and locked on its own; the first failure stops the run. Each
    host's pinned SSH key is verified first, even when nothing would change: exit 3 when a host
    cannot be reached or does not present its pinned key (the message names the fingerprint)."""
    from cli.stack import progress
    from dn import tenants

    c = ctx.obj
    with tenants.connect(c.settings, "up") as conn:
        sel = tenants.targets(c.settings, conn, tenant=tenant, host=host, all_=all_)
    results = []
    verified: set[str] = set()  # each host's pinned key is checked once per run
    for t in sel:
        name = tenants.stack_name(t)
        results += tenants.up_targets(c, [t], on_event=progress(c, name), verified=verified)
        r = results[-1]
        if not json:
            nums = ", ".join(f"{k} {v}" for k, v in sorted(r.changes.items())) or "no changes"
            c.out(f"{name}: up done ({nums})")
    if json:
        c.out_json([r.to_dict() for r in results])
