"""dn host: the baseline stack of an EU host (firewall policy, nginx main config, timers)."""
from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(help="EU hosts: the baseline stack shared by every tenant of a host.", no_args_is_help=True)


@app.command()
def up(
    ctx: typer.Context,
    host: Optional[str] = typer.Option(None, "--host", help="EU host (default settings.default_host)"),
    json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Apply the host baseline: INPUT policy DROP with only 80/443 public and SSH from the admin
    sources, nginx main config (TLS 1.2/1.3, HSTS), the platform backup, health-check, verify,
    drill and retention timers, and the directories dn needs. Audited, holds the host's lock;
    verifies the host's pinned SSH key first (exit 3 naming the fingerprint it presented)."""
    from cli.stack import progress
    from dn import tenants

    c = ctx.obj
    name = host or c.settings.default_host
    r = tenants.host_up(c, name, on_event=progress(c, tenants.host_stack_name(name)))
    if json:
        c.out_json(r.to_dict())
    else:
        nums = ", ".join(f"{k} {v}" for k, v in sorted(r.changes.items())) or "no changes"
        c.out(f"host {name}: up done ({nums})")


@app.command()
def destroy(
    ctx: typer.Context,
    host: Optional[str] = typer.Option(None, "--host", help="EU host (default settings.default_host)"),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation"),
    json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Remove the host baseline: dn's timers, the nginx main config (nginx stops), the firewall
    baseline (INPUT opens again) and dn's empty directories. Refused while tenants are registered
    on the host. Asks first unless --yes. Audited, holds the host's lock; verifies the host's
    pinned SSH key first (exit 3 naming the fingerprint it presented)."""
    import sys

    from cli.stack import progress
    from dn import tenants
    from dn.errors import InvalidInput

    c = ctx.obj
    name = host or c.settings.default_host
    if not yes:
        if not sys.stdin.isatty():
            raise InvalidInput("confirmation", "not a terminal: rerun with --yes to destroy the host baseline")
        if not typer.confirm(f"Remove dn's baseline from host {name}?", default=False, err=True):
            raise InvalidInput("confirmation", "not confirmed: nothing was destroyed")
    r = tenants.host_destroy(c, name, on_event=progress(c, tenants.host_stack_name(name)))
    if json:
        c.out_json(r.to_dict() if r else {"stack": tenants.host_stack_name(name), "op": "destroy", "changes": {}})
    else:
        c.out(f"host {name}: baseline removed" if r else f"host {name}: no baseline stack")


@app.command()
def show(
    ctx: typer.Context,
    host: Optional[str] = typer.Option(None, "--host", help="EU host (default settings.default_host)"),
    json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Show a host's baseline spec, its tenants and its stack's last update."""
    from dn import tenants

    c = ctx.obj
    data = tenants.host_show(c, host)
    if json:
        c.out_json(data)
        return
    h, s = data["host"], data["stack"]
    c.out(f"host {h['name']}: prefix {h['prefix']}, public ports {', '.join(map(str, h['public_ports']))}, "
          f"SSH from {', '.join(h['admin_sources'])}")
    c.out(f"  tenants: {', '.join(data['tenants']) or 'none'}")
    if s.get("error"):
        c.out(f"  stack {s['name']}: {s['error']}")
    elif not s["exists"]:
        c.out(f"  stack {s['name']}: not created yet (`dn host up`)")
    else:
        c.out(f"  stack {s['name']}: last {s.get('last_kind') or '-'} {s.get('last_result') or '-'} "
              f"at {s.get('last_update') or '-'}")
