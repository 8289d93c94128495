"""dn doctor: every prerequisite, checked and explained."""
from __future__ import annotations

import typer

app = typer.Typer(help="Check every prerequisite (Pulumi CLI, plugins, SSH, host services, PostgreSQL) and say how to fix it.")


@app.callback(invoke_without_command=True)
def doctor(ctx: typer.Context, json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Check every prerequisite and say how to fix what is missing.

    Exit 0 when every required check passes; 3 when only reachability failed; 2 for configuration
    problems; 1 otherwise. Optional checks (e.g. device-mapper in the sandbox) never fail the run.
    """
    from dn import doctor as core

    obj = ctx.obj
    checks = core.run_all(obj)
    if json:
        obj.out_json([c.to_dict() for c in checks])
    else:
        for c in checks:
            mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
            obj.out(f"{mark} {c.name:28} {c.detail}")
            if not c.ok and c.fix:
                obj.out(f"     {'':28} fix: {c.fix}")
    raise typer.Exit(core.exit_code(checks))
