"""dn export: one tenant's data as a ZIP."""
from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Export one tenant's data as a ZIP (configuration, events, aggregates, invoices).",
                  subcommand_metavar="")


@app.callback(invoke_without_command=True, context_settings={"allow_interspersed_args": True})
def export(
    ctx: typer.Context,
    tenant: str = typer.Argument(..., help="the tenant's slug"),
    out: Path = typer.Option(..., "--out", "-o", help="the ZIP file to write (mode 0600)"),
    force: bool = typer.Option(False, "--force", help="replace --out if it exists"),
    json: bool = typer.Option(False, "--json", help="print the manifest as JSON"),
) -> None:
    """Write TENANT's configuration (no secrets), users, GTM workspaces, events, hourly
    statistics and invoices into a ZIP (CSV and JSON, described by README.txt and manifest.json
    inside), from one consistent snapshot, streamed so memory stays flat. Audited."""
    from dn.gdpr import export as exp

    c = ctx.obj
    res = exp.export(c, tenant, out, force=force, progress=lambda s: c.err.print(s, markup=False, soft_wrap=True))
    if json:
        c.out_json(res.manifest())
        return
    for f in res.files:
        c.out(f"{f.name:<32} {f.rows:>10} rows  {f.bytes:>12} bytes")
    c.out(f"wrote {res.out}")
