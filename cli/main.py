"""The dn command: root callback, sub-command registration and the one error handler."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Optional

import typer

from dn.context import Context
from dn.errors import DnError, ExitCode

# One module per noun; each defines ``app``. Modules import nothing heavy at import time.
NOUNS: list[tuple[str, str]] = [
    ("runbook", "cli.runbook"),
]

app = typer.Typer(
    name="dn",
    help="dn — control plane for EU-hosted server-side GTM. Declares tenants, operates backups, proves the trust page.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def root(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", "-c", envvar="DN_CONFIG", help="configuration file (TOML)"),
    traceback: bool = typer.Option(False, "--traceback", help="print the full traceback of an unexpected error"),
) -> None:
    """Build the one context object every command receives."""
    ctx.obj = Context(config_path=config, traceback=traceback)


for _name, _module in NOUNS:
    app.add_typer(importlib.import_module(_module).app, name=_name)


def _report(e: BaseException, traceback: bool) -> int:
    from rich.console import Console
    from rich.markup import escape

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if traceback:
        import traceback as tb

        tb.print_exception(e)
    if isinstance(e, DnError):
        err.print(f"[bold red]error:[/] {escape(str(e))}")
        if e.hint:
            err.print(f"[yellow]next:[/] {escape(e.hint)}")
        if e.runbook:
            err.print(f"[yellow]runbook:[/] dn runbook show {escape(e.runbook)}")
        return int(e.exit_code)
    err.print(f"[bold red]unexpected error:[/] {escape(type(e).__name__)}: {escape((str(e).splitlines() or [''])[0][:200])}")
    err.print("rerun with --traceback for details")
    return int(ExitCode.FAILED)


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app with dn's single error handler.

    Usage errors are Typer's (exit 2). DnError maps to its documented exit code; anything else
    is one line plus "rerun with --traceback".
    """
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        app(args=args, prog_name="dn")
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except DnError as e:
        sys.exit(_report(e, traceback=False))
    except Exception as e:  # the one error handler for everything unexpected
        sys.exit(_report(e, traceback="--traceback" in args))


if __name__ == "__main__":
    run()
