"""dn setup: provide the pinned Pulumi CLI and the helpers dn's engine needs, once per machine."""
from __future__ import annotations

import typer

app = typer.Typer(help="Provide the pinned Pulumi CLI and its helpers (once per machine).")


@app.callback(invoke_without_command=True)
def setup(
    ctx: typer.Context,
    json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    rebuild: bool = typer.Option(False, "--rebuild", help="provide the CLI again even if the tools dir has it"),
) -> None:
    """Provide the pinned Pulumi CLI, print where each tool came from and its version.

    Sources, in order: a `pulumi` on PATH of the pinned version; the official installer when
    get.pulumi.com is reachable; a build from the Go module proxy (several minutes the first time,
    then cached in the tools dir: $DN_TOOLS_DIR, default ~/.cache/dn/tools).

    Exit 0 when every required tool is present; 1 otherwise, naming what is missing and how to
    provide it. Optional tools (pulumi-language-python, the docker provider plugin) are reported
    but never fail the run.
    """
    from dn import tooling

    obj = ctx.obj
    status = None

    def log(msg: str) -> None:
        obj.err.print(msg, markup=False, highlight=False)
        if status is not None:
            status.update(msg[:100])

    data_dir = None
    try:
        data_dir = obj.settings.data_dir
    except Exception as e:  # setup must work before dn is configured; the engine env needs the config
        obj.err.print(f"note: configuration not loaded ({type(e).__name__}); plugins in PULUMI_HOME not checked",
                      markup=False)
    with obj.err.status(f"providing pulumi v{tooling.PULUMI_VERSION}") as status:
        prov = tooling.ensure(
            environ=obj.environ, log=log, rebuild=rebuild,
            pulumi_home=tooling.pulumi_home(data_dir) if data_dir is not None else None,
        )
    status = None
    if json:
        obj.out_json(prov.to_dict())
    else:
        obj.out(f"tools dir: {prov.root}")
        for t in prov.tools:
            mark = "ok  " if t.present else ("MISSING" if t.required else "absent (optional)")
            where = f" {t.path}" if t.path else ""
            ver = f" v{t.version}" if t.version else ""
            src = f" [{t.source}]" if t.source else ""
            obj.out(f"{mark:8} {t.name}{ver}{src}{where}")
            if t.detail:
                obj.out(f"         {t.detail}")
            if not t.present and t.how:
                obj.out(f"         how: {t.how}")
    if not prov.ok:
        names = ", ".join(t.name for t in prov.missing)
        tried = "; ".join(f"{a['source']}: {a['reason']}" for a in prov.attempts if not a["ok"])
        obj.err.print(f"error: missing {names}" + (f" (tried {tried})" if tried else ""), markup=False)
        raise typer.Exit(1)
