"""dn health: the 60-second health check of every tenant's sGTM (run by the host's timer)."""
from __future__ import annotations

import typer

app = typer.Typer(help="Health check of every active tenant (container health and the public HTTPS path).", no_args_is_help=True)


@app.command("check")
def check(
    ctx: typer.Context,
    alert_after: int = typer.Option(3, "--alert-after", min=1, max=1000,
                                    help="alert after this many failed checks in a row (and once on recovery)"),
    tenant: str = typer.Option(None, "--tenant", help="check only this tenant"),
    json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Check every active tenant once. Exit 0 when all are healthy, 1 when any is not."""
    from dn import health

    c = ctx.obj
    results, delivered = health.check(c.settings, alert_after=alert_after, only=tenant)
    if json:
        c.out_json([r.to_dict() for r in results])
    else:
        if not results:
            c.out("no active tenants")
        for r in results:
            containers = ", ".join(f"{k.split('-')[-1]} {v}" for k, v in sorted(r.containers.items()))
            c.out(f"{'ok  ' if r.ok else 'FAIL'} {r.slug:20} {r.host:14} https {r.public:8} {containers} "
                  f"(failed {r.failures_in_a_row} in a row)")
    for line in delivered:
        c.err.print(line, soft_wrap=True, markup=False)
    raise typer.Exit(0 if all(r.ok for r in results) else 1)
