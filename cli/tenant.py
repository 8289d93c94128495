"""dn tenant: create, list, show, update and destroy tenants (each one Pulumi stack)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(help="Tenants: each one a Pulumi stack on its EU host.", no_args_is_help=True)

_CC_FILE = typer.Option(None, "--container-config-file", metavar="FILE",
                        help="file holding the sGTM CONTAINER_CONFIG (a secret: never give it on the command line)")
_CC_STDIN = typer.Option(False, "--container-config-stdin", help="read CONTAINER_CONFIG from stdin")


def _request(slug: str, file: Optional[Path], stdin: bool, **kw):
    """The request, with CONTAINER_CONFIG read from its file or stdin; a secret that cannot be
    read is reported together with every other invalid field, not alone."""
    from pydantic import SecretStr

    from cli.stack import read_secret
    from dn.errors import InvalidInput
    from dn.tenants import TenantRequest

    unreadable = []
    try:
        value = read_secret(file, stdin, "container_config", "container-config")
    except InvalidInput as e:
        value, unreadable = None, [(e.field, e.rule)]
    return TenantRequest(slug=slug, container_config=SecretStr(value) if value is not None else None,
                         unreadable=unreadable, **kw)


@app.command()
def create(
    ctx: typer.Context,
    slug: str = typer.Argument(..., help="tenant slug: 3-32 of a-z 0-9 -, starting with a letter"),
    domain: Optional[List[str]] = typer.Option(None, "--domain", metavar="DOMAIN", help="public hostname (repeat for more)"),
    plan: Optional[str] = typer.Option(None, "--plan", help="commercial plan (settings.plans; default standard)"),
    image: Optional[str] = typer.Option(None, "--image", help="sGTM image (default settings.images.sgtm)"),
    container_config_file: Optional[Path] = _CC_FILE,
    container_config_stdin: bool = _CC_STDIN,
    no_preview: bool = typer.Option(False, "--no-preview", help="do not run the sGTM preview server"),
    name: Optional[str] = typer.Option(None, "--name", help="display name (default: the slug)"),
    host: Optional[str] = typer.Option(None, "--host", help="EU host (default settings.default_host)"),
    backup_schedule: Optional[str] = typer.Option(None, "--backup-schedule", metavar="ONCALENDAR",
                                                  help="systemd OnCalendar of the daily backup"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate and print the plan; change nothing"),
    json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Create a tenant: validate, plan, register, then apply its stack (audited, locked).

    Rerunning the same create after a failed apply finishes it."""
    from cli.stack import print_plan, progress
    from dn import tenants

    c = ctx.obj
    req = _request(slug, container_config_file, container_config_stdin, domains=domain, plan=plan, image=image,
                   preview=False if no_preview else None, display_name=name, host=host,
                   backup_schedule=backup_schedule)
    plan_, result = tenants.create(c, req, dry_run=dry_run, on_event=progress(c, slug),
                                   on_plan=lambda p: None if dry_run else c.err.print(
                                       f"{p.action} tenant {p.spec.slug} on {p.host.name} (subnet {p.spec.subnet})",
                                       soft_wrap=True, markup=False))
    if dry_run:
        print_plan(c, plan_, as_json=json)
        return
    _done(c, plan_, result, json)


def _done(c, plan_, result, json: bool) -> None:
    data = {"tenant": plan_.spec.slug, "action": plan_.action, "host": plan_.host.name,
            "changes": result.changes if result else {}, "outputs": result.outputs if result else {}}
    if json:
        c.out_json(data)
    else:
        nums = ", ".join(f"{k} {v}" for k, v in sorted(data["changes"].items())) or "no changes"
        c.out(f"{plan_.spec.slug}: {plan_.action} done ({nums})")


@app.command("list")
def list_(
    ctx: typer.Context,
    host: Optional[str] = typer.Option(None, "--host", help="only tenants of this host"),
    all_: bool = typer.Option(False, "--all", help="include deleted tenants"),
    json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """List the registered tenants."""
    from dn import tenants

    c = ctx.obj
    with tenants.connect(c.settings, "tenant list") as conn:
        recs = tenants.list_tenants(conn, host=host, include_deleted=all_)
    if json:
        c.out_json([r.to_dict() for r in recs])
        return
    if not recs:
        c.err.print("no tenants", soft_wrap=True)
        return
    for r in recs:
        c.out(f"{r.slug:24} {r.status:10} {r.plan:10} {r.host:14} {r.subnet:18} {', '.join(r.domains)}")


@app.command()
def show(
    ctx: typer.Context,
    slug: str = typer.Argument(..., help="tenant slug"),
    json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Show a tenant: its registry entry, the resources it has on its host, and its stack."""
    from dn import tenants

    c = ctx.obj
    data = tenants.show(c, slug)
    if json:
        c.out_json(data)
        return
    t = data["tenant"]
    c.out(f"{t['slug']} ({t['display_name']}): {t['status']}, plan {t['plan']}, host {t['host']}")
    c.out(f"  domains: {', '.join(t['domains'])}")
    c.out(f"  image: {t['image']}   subnet: {t['subnet']}   backup: {t['backup_schedule']}   "
          f"preview server: {'yes' if t['preview'] else 'no'}")
    for r in data["resources"]:
        rest = ", ".join(f"{k}={v}" for k, v in r.items() if k != "kind")
        c.out(f"  {r['kind']:9} {rest}")
    s = data["stack"]
    if s.get("error"):
        c.out(f"  stack {s['name']}: {s['error']}")
    elif not s["exists"]:
        c.out(f"  stack {s['name']}: not created yet")
    else:
        c.out(f"  stack {s['name']}: last {s.get('last_kind') or '-'} {s.get('last_result') or '-'} "
              f"at {s.get('last_update') or '-'}, {s.get('resources', 0)} resources")


@app.command()
def update(
    ctx: typer.Context,
    slug: str = typer.Argument(..., help="tenant slug"),
    domain: Optional[List[str]] = typer.Option(None, "--domain", metavar="DOMAIN",
                                               help="replace the domains (repeat for more)"),
    plan: Optional[str] = typer.Option(None, "--plan", help="new plan"),
    image: Optional[str] = typer.Option(None, "--image", help="new sGTM image"),
    container_config_file: Optional[Path] = _CC_FILE,
    container_config_stdin: bool = _CC_STDIN,
    preview: Optional[bool] = typer.Option(None, "--preview/--no-preview", help="run the sGTM preview server or not"),
    status: Optional[str] = typer.Option(None, "--status", help="active or suspended (suspended serves 503)"),
    name: Optional[str] = typer.Option(None, "--name", help="display name"),
    backup_schedule: Optional[str] = typer.Option(None, "--backup-schedule", metavar="ONCALENDAR"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate and print the plan; change nothing"),
    json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Change a tenant and apply it (audited, locked)."""
    from cli.stack import print_plan, progress
    from dn import tenants

    c = ctx.obj
    req = _request(slug, container_config_file, container_config_stdin, domains=domain, plan=plan, image=image,
                   preview=preview, status=status, display_name=name, backup_schedule=backup_schedule)
    plan_, result = tenants.update(c, req, dry_run=dry_run, on_event=progress(c, slug))
    if dry_run:
        print_plan(c, plan_, as_json=json)
        return
    _done(c, plan_, result, json)


@app.command()
def destroy(
    ctx: typer.Context,
    slug: str = typer.Argument(..., help="tenant slug"),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation"),
    json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Remove a tenant from its host: containers, network, vhost, firewall chains, LUKS volume
    (crypto-erased), timers, its stack and its registry entry. Asks first unless --yes; refused
    while a GDPR request or a restore is open for the tenant."""
    import sys

    from cli.stack import progress
    from dn import tenants

    c = ctx.obj

    def confirm(rec, resources) -> bool:
        if yes:
            return True
        c.err.print(f"destroy tenant {rec.slug} on {rec.host}; this removes:", soft_wrap=True, markup=False)
        for r in resources:
            rest = ", ".join(f"{k}={v}" for k, v in r.items() if k != "kind")
            c.err.print(f"  {r['kind']:9} {rest}", soft_wrap=True, markup=False, highlight=False)
        if not sys.stdin.isatty():
            c.err.print("not a terminal: rerun with --yes to confirm", soft_wrap=True)
            return False
        return typer.confirm(f"Type y to destroy {rec.slug}", default=False, err=True)

    result = tenants.destroy(c, slug, confirm=confirm, on_event=progress(c, slug))
    if json:
        c.out_json(result.to_dict())
    else:
        c.out(f"{slug}: destroyed ({'registry entry removed' if result.registry == 'deleted' else 'registry entry kept as cancelled: other records reference it'})")
