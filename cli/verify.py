"""dn verify: check every claim of the trust page against the live host and keep the evidence."""
from __future__ import annotations

from typing import List, Optional

import typer

app = typer.Typer(help="Check every claim of the trust page against the live host; keep the evidence.")

FORMATS = ("table", "json", "markdown")


@app.callback(invoke_without_command=True)
def verify(
    ctx: typer.Context,
    check: Optional[List[str]] = typer.Option(None, "--check", metavar="ID",
                                              help="run only this check (repeatable); see `dn verify list`"),
    host: Optional[str] = typer.Option(None, "--host", metavar="NAME", help="the host to verify (default: default_host)"),
    json: bool = typer.Option(False, "--json", help="print JSON (same as --format json)"),
    fmt: str = typer.Option("table", "--format", metavar="table|json|markdown", help="output format"),
    alert: bool = typer.Option(False, "--alert", help="send the alert (settings alert) when a check FAILs"),
) -> None:
    """Check every technical claim of the trust page on the live host and print the evidence.

    Each check has a stable id and ends PASS, FAIL (the evidence says why) or UNKNOWN (it could
    not look; the reason says why). Every run is kept in the evidence history (<data_dir>/evidence,
    with time and host); `dn verify history` shows when each claim last passed.

    Exit codes: 0 every check passed; 4 a check failed; 1 none failed but some could not look
    (e.g. the host or the database was unreachable: the reasons are printed); 2 invalid input
    (an unknown --check, --format or --host).
    """
    if ctx.invoked_subcommand is not None:
        return
    from datetime import datetime, timezone

    from dn.errors import InvalidInput
    from dn.verify import core
    from dn.verify.claims import CLAIMS
    from dn.verify.probe import Probe

    c = ctx.obj
    fmt = "json" if json else fmt
    if fmt not in FORMATS:
        raise InvalidInput("--format", f"must be one of {', '.join(FORMATS)}, not {fmt!r}")
    selected = core.select(list(CLAIMS), check)
    settings = c.settings
    started = datetime.now(timezone.utc)

    def progress(r: core.Result) -> None:
        c.err.print(f"  {_styles()[r.status]}{r.status.value:7}[/] {r.id} [dim]({r.seconds:.1f}s)[/]", soft_wrap=True)

    with Probe(settings, host, environ=c.environ, now=started,
               progress=lambda s: c.err.print(f"[dim]{s}[/]", soft_wrap=True)) as probe:
        c.err.print(f"verifying {len(selected)} claims on {probe.host_name} ({probe.host.address})", soft_wrap=True)
        results = core.run_checks(selected, probe, on_result=progress)
        host_name = probe.host_name
    path = core.record(settings.data_dir, host_name, results, started)
    code = core.exit_code(results)
    if fmt == "json":
        doc = core.to_json(results, host_name)
        doc.update({"time": started.isoformat(), "evidence_file": str(path)})
        c.out_json(doc)
    elif fmt == "markdown":
        c.out(core.to_markdown(results, host_name, started))
    else:
        _table(results, host_name, started)
    counts = {s: sum(r.status is s for r in results) for s in core.Status}
    c.err.print(f"{counts[core.Status.PASS]} passed, {counts[core.Status.FAIL]} failed, "
                f"{counts[core.Status.UNKNOWN]} unknown; evidence kept in {path}", soft_wrap=True)
    if alert and counts[core.Status.FAIL]:
        from dn import alert as alerts

        failed = [r for r in results if r.status is core.Status.FAIL]
        summary = "\n".join(f"FAIL {r.id}: {r.claim}\n  " + "\n  ".join(r.evidence[:5]) for r in failed)
        for line in alerts.send(settings.alert, f"[dn] verify: {len(failed)} claim(s) FAIL on {host_name}",
                                core.to_json(results, host_name), summary, c.environ):
            c.err.print(line, soft_wrap=True, markup=False)
    raise typer.Exit(code)


def _styles():
    from dn.verify.core import Status

    return {Status.PASS: "[green]", Status.FAIL: "[bold red]", Status.UNKNOWN: "[yellow]"}


def _table(results, host: str, when) -> None:
    from rich.console import Console
    from rich.table import Table

    from dn.verify.core import Status

    out = Console(highlight=False, soft_wrap=False)
    table = Table(title=f"dn verify — {host}, {when:%Y-%m-%d %H:%M} UTC", show_lines=False)
    table.add_column("check", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("claim")
    table.add_column("evidence / reason")
    for r in results:
        first = r.reason if r.status is Status.UNKNOWN else (r.evidence[0] if r.evidence else "")
        table.add_row(r.id, f"{_styles()[r.status]}{r.status.value}[/]", r.claim, first or "")
    out.print(table)
    for r in results:
        if r.status is Status.PASS:
            continue
        out.print(f"\n{_styles()[r.status]}{r.status.value}[/] [bold]{r.id}[/]: {r.claim}", markup=True)
        if r.reason:
            out.print(f"  reason: {r.reason}", markup=False)
        for line in r.evidence:
            out.print(f"  {line}", markup=False)


@app.command("history")
def history(
    ctx: typer.Context,
    json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """When each claim last ran, its last result and when it last passed (from the evidence history)."""
    from dn.verify import core
    from dn.verify.claims import ids

    c = ctx.obj
    runs = core.history(c.settings.data_dir)
    last = core.last_passed(runs)
    order = {i: n for n, i in enumerate(ids())}
    rows = sorted(last.values(), key=lambda e: (order.get(e["id"], len(order)), e["id"]))
    if json:
        c.out_json({"runs": len(runs), "checks": rows})
        return
    if not rows:
        c.err.print("no verify run recorded yet: run `dn verify`", soft_wrap=True)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dn verify history — {len(runs)} runs")
    for col in ("check", "last result", "last run", "last passed", "host"):
        table.add_column(col, no_wrap=True)
    for e in rows:
        style = _styles()[core.Status(e["last_status"])]
        table.add_row(e["id"], f"{style}{e['last_status']}[/]", e["last_run"][:19].replace("T", " "),
                      (e["last_pass"] or "never")[:19].replace("T", " "), e["host"])
    Console(highlight=False).print(table)


@app.command("list")
def list_checks(
    ctx: typer.Context,
    json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Every check: its id, the trust page's claim and the method."""
    from dn.verify.claims import CLAIMS

    c = ctx.obj
    if json:
        c.out_json([{"id": x.id, "claim": x.claim, "method": x.method} for x in CLAIMS])
        return
    for x in CLAIMS:
        c.out(f"{x.id:22} {x.claim}\n{'':22} method: {x.method}")
