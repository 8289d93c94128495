"""dn gdpr: GDPR deletion requests — plan, execute with a certificate, status."""
from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(help="GDPR deletion requests: register, plan and execute with a certificate, status.",
                  no_args_is_help=True)


def _urgency(days_left: int) -> str:
    if days_left < 0:
        return "bold red"
    if days_left <= 3:
        return "red"
    if days_left <= 10:
        return "yellow"
    return "green"


@app.command("delete")
def delete(
    ctx: typer.Context,
    tenant: str = typer.Argument(..., help="the tenant's slug"),
    request_id: int = typer.Option(..., "--request-id", help="the deletion request's id (`dn gdpr status`)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan only; change nothing"),
    yes: bool = typer.Option(False, "--yes", help="do not ask for confirmation"),
    json: bool = typer.Option(False, "--json", help="print the plan or certificate as JSON"),
) -> None:
    """Erase a tenant for a GDPR deletion request, then print its deletion certificate.

    First the plan: what is destroyed (the tenant's stack), crypto-erased (its LUKS volume),
    crypto-shredded (its backup keys), deleted (rows per the data map, with counts), retained and
    why, and the deadline. Then, once confirmed, a journaled run: rerun the same command after
    any failure or crash and it continues where it stopped. A request already completed prints
    its certificate and changes nothing (exit 0). Refused: unknown tenant or request (2), a
    database the data map does not cover (4), the tenant's lock held by another operation (5).
    """
    import sys

    from dn.errors import InvalidInput
    from dn.gdpr import certificate, plan, workflow

    c = ctx.obj

    def confirm(p: workflow.Prepared) -> bool:
        if yes:
            return True
        if not sys.stdin.isatty():
            raise InvalidInput("--yes", "no terminal to confirm on: review the plan with --dry-run, then pass --yes")
        c.err.print(plan.render_text(p.plan), markup=False, soft_wrap=True)
        return typer.confirm(f"Erase tenant {p.tenant.slug} for request {p.request.id}? This cannot be undone", err=True)

    def on_event(step: str, phase: str, detail: str) -> None:
        if phase in ("start", "done", "skip") or (phase == "progress" and not step):
            c.err.print(f"{step or '·'}: {phase} {detail}".rstrip(), markup=False, soft_wrap=True)

    out = workflow.delete(c, tenant, request_id, dry_run=dry_run, confirm=confirm, on_event=on_event)
    if out.dry_run:
        if json:
            c.out_json(out.prepared.plan.to_dict())
        else:
            c.out(plan.render_text(out.prepared.plan))
        return
    if out.already_done:
        c.err.print(f"request {request_id} was already completed: nothing was done; its certificate follows",
                    soft_wrap=True)
    if json:
        c.out_json({"certificate": out.certificate, "sha256": out.sha256, "file": out.file})
    else:
        c.out(certificate.render_text(out.certificate, out.sha256))
        c.out(f"certificate: {out.file}")


@app.command("request")
def request(
    ctx: typer.Context,
    tenant: str = typer.Argument(..., help="the tenant's slug"),
    received: Optional[str] = typer.Option(None, "--received", metavar="YYYY-MM-DD",
                                           help="when the request arrived (default: now); the deadline counts from it"),
    json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Register a deletion request received outside the dashboard (e-mail, letter). Prints its id;
    the deadline is retention.gdpr_deadline_days (30) after it was received. Audited."""
    from datetime import datetime, timezone

    from dn.errors import InvalidInput
    from dn.gdpr import workflow

    c = ctx.obj
    when = None
    if received:
        try:
            when = datetime.strptime(received, "%Y-%m-%d").replace(tzinfo=timezone.utc)
        except ValueError:
            raise InvalidInput("--received", f"{received!r} is not a date YYYY-MM-DD") from None
    r = workflow.register(c, tenant, when)
    if json:
        c.out_json(r)
    else:
        c.out(f"request {r['request_id']} for {r['tenant']}: received {r['received_at'][:16]}, due {r['due_at'][:16]}")


@app.command("status")
def status(
    ctx: typer.Context,
    json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Open deletion requests with the days left (red: overdue or 3 days or less, yellow: 10 or
    less), then finished ones with their certificates."""
    from rich.markup import escape

    from dn import db
    from dn.gdpr import workflow

    c = ctx.obj
    with db.connect(c.settings.database, application_name="dn gdpr status") as conn:
        st = workflow.status(conn, c.settings)
    if json:
        c.out_json(st)
        return
    if not st["open"] and not st["finished"]:
        c.err.print("no deletion requests", soft_wrap=True)
        return
    import sys

    from rich.console import Console

    out = Console(file=sys.stdout, highlight=False, soft_wrap=True)
    for o in st["open"]:
        left = o["days_left"]
        when = f"OVERDUE by {-left} day(s)" if o["overdue"] else f"{left} day(s) left"
        steps = f"  done: {', '.join(o['steps_done'])}" if o["steps_done"] else ""
        out.print(f"[{_urgency(left)}]open  #{o['request_id']:<6} {escape(o['tenant']):24} due {o['due_at'][:10]}  "
                  f"{when}  ({o['status']}){escape(steps)}[/]")
    for f in st["finished"]:
        late = "" if f["on_time"] else "  LATE"
        cert = f"certificate {f['certificate_sha256'][:16]}… {f['certificate']}" if f["certificate_sha256"] else "no certificate"
        out.print(f"done  #{f['request_id']:<6} {escape(f['tenant']):24} {f['completed_at'][:10]}{late}  {escape(cert)}")
