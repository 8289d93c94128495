"""dn retention: enforce the data map's retention periods."""
from __future__ import annotations

import typer

app = typer.Typer(help="Enforce the data map's retention periods (run daily from a timer).", no_args_is_help=True)


@app.command("enforce")
def enforce(
    ctx: typer.Context,
    dry_run: bool = typer.Option(False, "--dry-run", help="count what has expired; delete nothing"),
    json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Delete what has passed its retention period (retention.*: events 15 days, aggregates 24
    months, accounting 5 years from the end of the year, audit 90 days via the anchored prune),
    in batches, with counts per table. Audited; refuses a database the data map does not cover (4)."""
    from dn.gdpr import retention

    c = ctx.obj
    res = retention.run(c, dry_run=dry_run, progress=lambda s: c.err.print(s, markup=False, soft_wrap=True))
    if json:
        c.out_json(res.to_dict())
        return
    verb = "expired" if dry_run else "deleted"
    for t in res.tables:
        n = t.expired if dry_run else t.deleted
        c.out(f"{t.table:<16} {n:>10} {verb}  (older than {t.period}: before {t.cutoff[:19]})")
