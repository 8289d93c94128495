"""The dn command: root callback, sub-command registration and the one error handler."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Optional

# Plain help output: Typer's rich help formatter imports rich.markdown and markdown-it, which
# triples the cold start of every `--help` (bench/startup.py). Errors stay rich (dn's handler).
os.environ.setdefault("TYPER_USE_RICH", "0")
# pydantic scans installed entry points for plugins on first use; dn uses none.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "1")

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

from dn.context import Context
from dn.errors import DnError, ExitCode

# One module per noun, each defining ``app``; imported only when that noun is used, so
# `dn --help` and `dn <noun> --help` stay fast. (name, module, one-line help)
NOUNS: list[tuple[str, str, str]] = [
    ("doctor", "cli.doctor", "Check every prerequisite and say how to fix what is missing."),
    ("health", "cli.health", "Health check of every active tenant (run every 60 s by the host's timer)."),
    ("runbook", "cli.runbook", "Runbooks: incident response, key compromise, passphrase loss."),
    ("audit", "cli.audit", "The audit log of privileged actions: show, verify, prune."),
    ("db", "cli.db", "The platform database: schema migrations and status."),
    ("lock", "cli.lock", "Tenant and host locks: list, break a crashed run's lock."),
    ("setup", "cli.setup", "Provide the pinned Pulumi CLI and its helpers (once per machine)."),
    ("sandbox", "cli.sandbox", "The disposable sandbox EU host on this machine: up, down, status."),
    ("tenant", "cli.tenant", "Tenants: create, list, show, update, destroy (one Pulumi stack each)."),
    ("host", "cli.host", "EU hosts: the baseline stack (firewall, nginx main config, timers)."),
    ("up", "cli.up", "Apply stacks: --tenant SLUG, --host NAME or --all."),
    ("preview", "cli.preview", "What `dn up` would change: text, pull-request markdown or JSON."),
    ("refresh", "cli.refresh", "Find drift on the hosts (exit 4 when found)."),
    ("backup", "cli.backup", "Encrypted backups in the second EU region: run, list, prune, shred."),
    ("dr", "cli.dr", "Disaster recovery: restore drills measuring RPO/RTO, status, restore."),
    ("verify", "cli.verify", "Check every claim of the trust page on the live host; keep the evidence."),
    ("gdpr", "cli.gdpr", "GDPR deletion requests: register, erase with a certificate, status."),
    ("retention", "cli.retention", "Enforce the data map's retention periods (daily timer)."),
    ("keys", "cli.keys", "Fernet keys of the platform's encrypted secrets: rotate, status."),
    ("export", "cli.export", "Export one tenant's data as a ZIP (configuration, events, aggregates, invoices)."),
]


class LazyNouns(TyperGroup):
    """The root group: nouns are listed from NOUNS and imported on first use."""

    def list_commands(self, ctx) -> list[str]:
        return sorted(set(self.commands) | {n for n, _, _ in NOUNS})

    def get_command(self, ctx, cmd_name: str):
        for name, module, _ in NOUNS:
            if name == cmd_name and name not in self.commands:
                cmd = typer.main.get_group(importlib.import_module(module).app)
                cmd.name = name
                self.commands[name] = cmd
        return self.commands.get(cmd_name)

    def format_commands(self, ctx, formatter) -> None:
        helps = {n: h for n, _, h in NOUNS}
        rows = [(n, helps.get(n) or self.commands[n].get_short_help_str(60)) for n in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

app = typer.Typer(
    name="dn",
    help="dn — control plane for EU-hosted server-side GTM. Declares tenants, operates backups, proves the trust page.",
    no_args_is_help=True,
    cls=LazyNouns,
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
