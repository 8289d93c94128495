"""dn preview: what `dn up` would change, as text, a pull-request comment or JSON."""
from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(invoke_without_command=True)


@app.callback(invoke_without_command=True)
def preview(
    ctx: typer.Context,
    tenant: Optional[str] = typer.Option(None, "--tenant", help="one tenant's stack"),
    host: Optional[str] = typer.Option(None, "--host", help="one host's baseline stack"),
    all_: bool = typer.Option(False, "--all", help="every host baseline and every tenant (the default)"),
    format: str = typer.Option("text", "--format", help="text, markdown (the pull-request comment) or json"),
    no_policy: bool = typer.Option(False, "--no-policy", help="skip dn's policy pack"),
) -> None:
    """Show what `dn up` would change, per stack: counts of create/update/replace/delete, deletes
    and replacements of stateful resources first, compliance-relevant changes flagged, policy
    results, then every changed property (dynamic resources diffed from their inputs).

    Exit codes: 0 when the previews ran and no mandatory policy is violated — whether anything
    would change is in the output ("changed" in --format json, the first line otherwise);
    4 when a mandatory policy is violated; 1 when a stack could not be previewed; 2 for bad
    options. Nothing is changed on any host; a stack previewed for the first time is created
    empty in the state backend."""
    from dn import preview as pv
    from dn import tenants
    from dn.errors import ExitCode, InvalidInput

    c = ctx.obj
    if format not in ("text", "markdown", "json"):
        raise InvalidInput("--format", f"{format!r} must be text, markdown or json")
    if not (tenant or host):
        all_ = True
    with tenants.connect(c.settings, "preview") as conn:
        sel = tenants.targets(c.settings, conn, tenant=tenant, host=host, all_=all_)
    result = tenants.preview_targets(c, sel, policy=not no_policy)
    render = {"text": pv.render_text, "markdown": pv.render_markdown, "json": pv.to_json}[format]
    c.out(render(result))
    code = pv.exit_code(result)
    if code != ExitCode.OK:
        raise typer.Exit(int(code))
