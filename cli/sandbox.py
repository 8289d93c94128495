"""dn sandbox: the disposable sandbox EU host on this machine."""
from __future__ import annotations

import time

import typer

app = typer.Typer(
    help="The disposable sandbox EU host on this machine: network namespaces dn-eu1 (sshd, dockerd, "
         "nginx) and dn-eu2 (SFTP backup target), plus the local PostgreSQL cluster. Needs root.",
    no_args_is_help=True,
)


VM_HELP = ("the VM sandbox host instead: a booted Debian 12 machine under QEMU (systemd, device-mapper, "
           "production paths) on 10.231.9.2 via the tap device dn-vm0; the netns sandbox is not touched")


@app.command()
def up(ctx: typer.Context, vm: bool = typer.Option(False, "--vm", help=VM_HELP)) -> None:
    """Create the sandbox, or repair what is missing. Idempotent; quick when already up.

    Writes dn's client key, known_hosts, state passphrase and pgpass to <data_dir>/sandbox/.
    With --vm: builds the VM image once per machine (cached by its recipe's hash under
    ~/.cache/dn/vm), boots it, deploys this dn onto it, writes <data_dir>/vm/ (key, known_hosts
    pinned from the image, config.toml with the VM host as default host) and prints the
    configuration file's path (use it with DN_CONFIG or --config).
    """
    c = ctx.obj
    started = time.monotonic()
    if vm:
        from dn import vm as dnvm

        parts, config = dnvm.up(c.settings.data_dir, progress=lambda m: c.err.print(f"[dim]vm:[/] {m}"))
        c.err.print(f"vm sandbox host up ({len(parts)} parts) in {time.monotonic() - started:.1f}s")
        c.out(str(config))
        return
    from dn import sandbox

    embedded = c.settings.source.startswith("embedded default")
    parts = sandbox.up(c.settings.data_dir, embedded=embedded,
                       progress=lambda m: c.err.print(f"[dim]sandbox:[/] {m}"))
    c.err.print(f"sandbox up ({len(parts)} parts) in {time.monotonic() - started:.1f}s")


@app.command()
def down(ctx: typer.Context, vm: bool = typer.Option(False, "--vm", help="the VM sandbox host only")) -> None:
    """Remove the sandbox: its processes, namespaces, mounts, PostgreSQL cluster and files,
    including the sandbox/ files of every data dir that used it. A data dir on the embedded
    default keeps no records of the destroyed world: its stacks, state, audit witness, backup
    keys, drill history, evidence and GDPR certificates move to <data_dir>/sandbox-reset-<time>/.
    With --vm: stops the VM host only (its disk overlay, tap device and this data dir's vm/
    files go; the cached image stays), leaving the netns sandbox as it is."""
    c = ctx.obj
    started = time.monotonic()
    if vm:
        from dn import vm as dnvm

        dnvm.down(c.settings.data_dir, progress=lambda m: c.err.print(f"[dim]vm:[/] {m}"))
        c.err.print(f"vm sandbox host down in {time.monotonic() - started:.1f}s")
        return
    from dn import sandbox

    sandbox.down(progress=lambda m: c.err.print(f"[dim]sandbox:[/] {m}"))
    c.err.print(f"sandbox down in {time.monotonic() - started:.1f}s")


@app.command()
def status(ctx: typer.Context, json: bool = typer.Option(False, "--json", help="print JSON"),
           vm: bool = typer.Option(False, "--vm", help="the VM sandbox host's parts (qemu, tap, sshd, client files)")) -> None:
    """Report each part (netns, sshd, dockerd, nginx, second region, PostgreSQL, image, client files)
    as up or down. Exit code 0 when every part is up, 1 otherwise."""
    from dn import sandbox

    c = ctx.obj
    if vm:
        from dn import vm as dnvm

        parts = dnvm.status(c.settings.data_dir)
    else:
        parts = sandbox.status(c.settings.data_dir)
    if json:
        c.out_json(sandbox.status_json(parts))
    else:
        width = max(len(p.name) for p in parts)
        c.out("\n".join(f"{p.name:<{width}}  {'up  ' if p.up else 'down'}  {p.detail}" for p in parts))
    if not all(p.up for p in parts):
        raise typer.Exit(1)


@app.command()
def cert(
    ctx: typer.Context,
    domains: list[str] = typer.Argument(..., help="the tenant's domains; the first names the files"),
    host: str = typer.Option(None, "--host", help="sandbox host name (default: the default host)"),
) -> None:
    """Install a self-signed certificate for DOMAINS on the sandbox host (what ACME does on a real host)."""
    from dn import sandbox

    c = ctx.obj
    h = c.settings.host(host)
    crt, _ = sandbox.issue_certificate(h.prefix, c.settings.tls.cert_dir, domains)
    c.out(str(crt))
