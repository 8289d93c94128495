"""dn runbook: the runbooks a person follows under stress."""
from __future__ import annotations

import typer

app = typer.Typer(help="Runbooks: incident response, key compromise, passphrase loss, DR, deletion.", no_args_is_help=True)


@app.command("list")
def list_(ctx: typer.Context, json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """List the runbooks."""
    from dn import runbooks

    books = runbooks.all_runbooks()
    if json:
        ctx.obj.out_json([{"name": b.name, "title": b.title} for b in books])
        return
    for b in books:
        ctx.obj.out(f"{b.name:24} {b.title}")


@app.command("show")
def show(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="NAME or NAME#section"),
    json: bool = typer.Option(False, "--json", help="print JSON: name, section, text and the section anchors"),
) -> None:
    """Print a runbook, or one section of it (NAME#section)."""
    from dn import runbooks

    text = runbooks.get(name)
    if json:
        book, _, section = name.partition("#")
        ctx.obj.out_json({"name": book, "section": section or None, "text": text,
                          "sections": list(runbooks.sections_of(runbooks.get(book)))})
        return
    ctx.obj.out(text)
