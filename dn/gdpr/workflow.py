"""GDPR deletion requests: the journaled, resumable deletion behind `dn gdpr delete`, request
registration and `dn gdpr status`.

A deletion runs the steps of :data:`dn.gdpr.plan.STEPS`. Each step is recorded in
``gdpr_steps`` as *started* before it acts and *done* (with its result) after; the plan and the
tenant's row counts are recorded in ``gdpr_runs`` first. Rerunning the same command after a crash
at any point skips the steps recorded done and runs the others again; every step is idempotent
(setting a status, erasing an erased volume, destroying a destroyed stack, shredding shredded
keys, deleting deleted rows), so a step that crashed between acting and being recorded is simply
repeated, never skipped. The last step writes the certificate, marks the tenant deleted and the
request done in one transaction, so a request is either finished with its certificate or not
finished at all.

The tenant is disabled first: its status becomes ``deleting`` and the database's write guard
(dn/schema/004_gdpr.sql) refuses new rows for it from then on.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from dn.errors import InvalidInput, OperationFailed
from dn.gdpr import certificate as certmod
from dn.gdpr import datamap as dmap
from dn.gdpr import plan as planmod
from dn.gdpr.batches import BATCH_ROWS, delete_in_batches
from dn.gdpr.sqlgen import column, count_sql, ident, tenant_condition
from dn.localfile import write_atomic

if TYPE_CHECKING:
    from dn.config import Settings
    from dn.context import Context
    from dn.db import Connection
    from dn.gdpr.resources import Resources

COMMAND = "gdpr delete"
SWEEPS = 3  # passes over the deleted tables until none holds a row of the tenant
STATUS_LOCK_TIMEOUT_MS = 10000
OnEvent = Callable[[str, str, str], None]  # (step, phase, detail); phases: start, progress, result, done, skip


def _quiet(step: str, phase: str, detail: str) -> None:
    pass


def check_slug(slug: str) -> str:
    from dn.config import NAME_RE

    if not re.fullmatch(NAME_RE, slug or ""):
        raise InvalidInput("TENANT", f"{slug!r} is not a tenant slug ({NAME_RE})")
    return slug


def check_request_id(value: int) -> int:
    if value is None or value < 1:
        raise InvalidInput("--request-id", "must be a positive number (the deletion request's id, see `dn gdpr status`)")
    return value


def certificate_dir(settings: "Settings") -> Path:
    return Path(settings.data_dir) / "gdpr" / "certificates"


def certificate_path(settings: "Settings", request_id: int) -> Path:
    return certificate_dir(settings) / f"request-{request_id}.json"


def _dn_version() -> str:
    try:
        from importlib.metadata import version

        return version("dn")
    except Exception:  # a checkout without package metadata
        return "unknown"


# -- reading the state ---------------------------------------------------------------------------
def _tenant(conn: "Connection", slug: str) -> planmod.Tenant:
    from dn import db

    r = db.row(conn, "SELECT id, slug, status, host FROM tenants WHERE slug = %s", (slug,))
    if r is None:
        raise InvalidInput("TENANT", f"no tenant named {slug!r} exists", hint="check the slug (`dn gdpr status` lists requests)")
    return planmod.Tenant(r["id"], r["slug"], r["status"], r["host"])


def _request(conn: "Connection", request_id: int) -> planmod.Request | None:
    from dn import db

    r = db.row(conn, "SELECT id, tenant_id, received_at, due_at, status, completed_at FROM deletion_requests "
                     "WHERE id = %s", (request_id,))
    return planmod.Request(**r) if r else None


def _run(conn: "Connection", request_id: int) -> dict[str, Any] | None:
    from dn import db

    return db.row(conn, "SELECT request_id, tenant_id, tenant_slug, previous_status, plan, started_at, finished_at, "
                        "certificate, certificate_sha256 FROM gdpr_runs WHERE request_id = %s", (request_id,))


def _steps(conn: "Connection", request_id: int) -> list[dict[str, Any]]:
    from dn import db

    return db.rows(conn, "SELECT step, position, state, attempts, started_at, finished_at, result FROM gdpr_steps "
                         "WHERE request_id = %s ORDER BY position", (request_id,))


def tenant_counts(conn: "Connection", dm: dmap.DataMap, tenant: planmod.Tenant) -> dict[str, int]:
    """The tenant's rows in every tenant-bound table of the data map."""
    out = {}
    with conn.transaction():
        # Right after a deletion the statistics still count the deleted rows: a sequential scan
        # would read through all of them where the tenant's index finds the few left at once.
        conn.execute("SET TRANSACTION READ ONLY")
        conn.execute("SET LOCAL enable_seqscan = off")
        for t in dm.tenant_bound():
            q, params = count_sql(t.name, tenant_condition(dm, t, tenant.id, tenant.slug))
            out[t.name] = conn.execute(q, params).fetchone()[0]
    return out


@dataclass
class Prepared:
    """Everything a deletion needs, read under one connection."""

    dm: dmap.DataMap
    catalog: dmap.Catalog
    tenant: planmod.Tenant
    request: planmod.Request
    plan: planmod.DeletionPlan
    run: dict[str, Any] | None
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return bool(self.run and self.run["finished_at"])

    @property
    def resuming(self) -> bool:
        return self.run is not None and not self.finished


def prepare(ctx: "Context", conn: "Connection", slug: str, request_id: int, *,
            dm: dmap.DataMap | None = None, resources: "Resources | None" = None) -> Prepared:
    """Check the request against the database and the data map and compute the plan.

    Refuses (InvalidInput) an unknown tenant or request, or a request of another tenant;
    refuses (PolicyViolation) a database with tables the data map does not cover."""
    from dn import db
    from dn.gdpr.resources import Resources, host_names

    check_slug(slug)
    check_request_id(request_id)
    dm = dm or dmap.load()
    resources = resources or Resources(ctx)
    with db.translate_errors("planning the GDPR deletion"):
        catalog = dmap.read_catalog(conn)
        dmap.require_coverage(dm, catalog, f"to delete tenant {slug}")
        tenant = _tenant(conn, slug)
        request = _request(conn, request_id)
        if request is None:
            raise InvalidInput("--request-id", f"no deletion request {request_id} exists",
                               hint=f"register it with `dn gdpr request {slug}` (it prints the id)")
        if request.tenant_id != tenant.id:
            raise InvalidInput("--request-id", f"deletion request {request_id} is not a request of tenant {slug}")
        run = _run(conn, request_id)
        if request.status == "done" and (run is None or run["finished_at"] is None):
            raise InvalidInput("--request-id", f"deletion request {request_id} is marked done, but dn holds no "
                                               "certificate for it", hint="see `dn gdpr status`")
        counts = tenant_counts(conn, dm, tenant)
        now = conn.execute("SELECT clock_timestamp()").fetchone()[0]
        steps = _steps(conn, request_id) if run else []
    names = host_names(ctx.settings, tenant.slug, tenant.host)
    the_plan = planmod.build(dm, tenant=tenant, request=request, counts=counts, foreign_keys=catalog.foreign_keys,
                             host=names, keys=resources.backup_keys(tenant.slug, tenant.id), now=now,
                             retention=ctx.settings.retention)
    if run is not None and not run["finished_at"]:
        done = [s["step"] for s in steps if s["state"] == "done"]
        the_plan.notes.append(f"resuming the deletion started {run['started_at']:%Y-%m-%d %H:%M} UTC; "
                              f"steps already done: {', '.join(done) or 'none'}")
    return Prepared(dm, catalog, tenant, request, the_plan, run, steps)


# -- executing -----------------------------------------------------------------------------------
class Deletion:
    """One deletion request carried out step by step, journaled in gdpr_runs/gdpr_steps."""

    def __init__(self, ctx: "Context", conn: "Connection", prepared: Prepared, *, resources: "Resources",
                 batch_size: int = BATCH_ROWS, on_event: OnEvent = _quiet) -> None:
        self.ctx = ctx
        self.conn = conn
        self.p = prepared
        self.res = resources
        self.batch_size = batch_size
        self.emit = on_event
        self.names = None

    @property
    def rid(self) -> int:
        return self.p.request.id

    def run(self) -> dict[str, Any]:
        """Run every step not yet done; returns the certificate (with its sha256 and file)."""
        from dn import db
        from dn.gdpr.resources import host_names

        self.names = host_names(self.ctx.settings, self.p.tenant.slug, self.p.tenant.host)
        with db.translate_errors(f"GDPR deletion of {self.p.tenant.slug}"):
            self._journal_start()
            done = {s["step"] for s in _steps(self.conn, self.rid) if s["state"] == "done"}
            for pos, step in enumerate(planmod.STEPS, 1):
                if step in done:
                    self.emit(step, "skip", "already done")
                    continue
                self._begin(pos, step)
                self.emit(step, "start", planmod.STEP_TITLES[step])
                if step == "certificate":
                    return self._certificate()
                result = getattr(self, "_step_" + step.replace("-", "_"))()
                self.emit(step, "result", str(result.get("summary", "")))
                self._end(step, result)
                self.emit(step, "done", str(result.get("summary", "")))
        raise OperationFailed(f"deletion request {self.rid}: the journal says every step is done, "
                              "but no certificate was written", where=f"tenant:{self.p.tenant.slug}")

    # -- journal -------------------------------------------------------------------------------
    def _journal_start(self) -> None:
        from dn import db

        t = self.p.tenant
        self.conn.execute(
            "INSERT INTO gdpr_runs (request_id, tenant_id, tenant_slug, previous_status, plan) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (request_id) DO NOTHING",
            (self.rid, t.id, t.slug, t.status, db.jsonb(self.p.plan.to_dict())))
        run = _run(self.conn, self.rid)
        if run["tenant_id"] != t.id:
            raise OperationFailed(f"deletion request {self.rid} was started for another tenant (id {run['tenant_id']})",
                                  where=f"tenant:{t.slug}")
        self.p.run = run

    def _begin(self, pos: int, step: str) -> None:
        self.conn.execute(
            "INSERT INTO gdpr_steps (request_id, position, step, state) VALUES (%s, %s, %s, 'started') "
            "ON CONFLICT (request_id, step) DO UPDATE SET attempts = gdpr_steps.attempts + 1",
            (self.rid, pos, step))

    def _end(self, step: str, result: Mapping[str, Any], conn: "Connection | None" = None) -> None:
        from dn import db

        (conn or self.conn).execute(
            "UPDATE gdpr_steps SET state = 'done', finished_at = clock_timestamp(), result = %s "
            "WHERE request_id = %s AND step = %s", (db.jsonb(dict(result)), self.rid, step))

    # -- steps ---------------------------------------------------------------------------------
    def _step_disable(self) -> dict[str, Any]:
        t = self.p.tenant
        with self.conn.transaction():
            self.conn.execute(f"SET LOCAL lock_timeout = '{STATUS_LOCK_TIMEOUT_MS}ms'")
            prev = self.conn.execute("SELECT status FROM tenants WHERE id = %s FOR UPDATE", (t.id,)).fetchone()[0]
            self.conn.execute("UPDATE tenants SET status = 'deleting', cancelled_at = coalesce(cancelled_at, now()) "
                              "WHERE id = %s AND status NOT IN ('deleting', 'deleted')", (t.id,))
            self.conn.execute("UPDATE deletion_requests SET status = 'running' WHERE id = %s AND status <> 'done'",
                              (self.rid,))
        # Writes for the tenant are refused from here on, so these counts are the "before" of the
        # certificate; counted again on a resume, still before any row was deleted (rows come later).
        counts = tenant_counts(self.conn, self.p.dm, t)
        return {"summary": f"tenant disabled (was {self.p.run['previous_status']}); "
                           f"{sum(counts.values())} rows of the tenant counted",
                "previous_status": self.p.run["previous_status"], "status_seen": prev, "counts": counts}

    def _step_luks(self) -> dict[str, Any]:
        return self.res.erase_volume(self.p.tenant.slug, self.names)

    def _step_stack(self) -> dict[str, Any]:
        return self.res.destroy_stack(self.p.tenant.slug, self.names)

    def _step_backup_keys(self) -> dict[str, Any]:
        return self.res.shred_backups(self.p.tenant.slug, self.p.tenant.id)

    def _step_rows(self) -> dict[str, Any]:
        dm, t = self.p.dm, self.p.tenant
        order = planmod.deletion_order(dm, self.p.catalog.foreign_keys)
        tables: dict[str, dict[str, Any]] = {}
        for sweep in range(1, SWEEPS + 1):
            for name in order:
                cond = tenant_condition(dm, dm.tables[name], t.id, t.slug)

                def on_batch(stats, n, name=name):
                    self.emit("rows", "progress", f"{name}: {stats.deleted} rows deleted ({stats.batches} batches)")

                table = dm.tables[name]
                stats = delete_in_batches(self.conn, name, cond, batch_size=self.batch_size, order=table.batch_key,
                                          prefix=(table.tenant.column, t.id) if table.batch_key else None,
                                          on_batch=on_batch)
                agg = tables.setdefault(name, {"deleted": 0, "batches": 0, "longest_batch_ms": 0.0})
                agg["deleted"] += stats.deleted
                agg["batches"] += stats.batches
                agg["longest_batch_ms"] = max(agg["longest_batch_ms"], round(stats.longest_ms, 1))
            left = {n: c for n, c in tenant_counts(self.conn, dm, t).items() if n in order and c}
            if not left:
                break
            self.emit("rows", "progress", f"sweep {sweep}: rows appeared meanwhile in {', '.join(left)}; deleting again")
        else:
            raise OperationFailed(f"rows of tenant {t.slug} keep appearing in {', '.join(left)} during the deletion",
                                  hint="stop whatever writes for the tenant and rerun the same command",
                                  where=f"tenant:{t.slug}")
        total = sum(v["deleted"] for v in tables.values())
        longest = max((v["longest_batch_ms"] for v in tables.values()), default=0.0)
        return {"summary": f"deleted {total} rows from {len(order)} tables in batches of {self.batch_size}; "
                           f"longest batch {longest} ms",
                "batch_size": self.batch_size, "tables": tables, "sweeps": sweep}

    def _step_minimise(self) -> dict[str, Any]:
        dm, t = self.p.dm, self.p.tenant
        done: dict[str, Any] = {}
        with self.conn.transaction():
            # dn's own maintenance passes the write guard (see dn/schema/004_gdpr.sql)
            self.conn.execute("SET LOCAL dn.gdpr_bypass = 'on'")
            for table in dm.tables.values():
                if table.on_delete != "minimise":
                    continue
                cond = tenant_condition(dm, table, t.id, t.slug)
                sets, params = [], []
                for col, how in table.minimise.items():
                    if how == "null":
                        sets.append(f"{column(col)} = NULL")
                    elif how == "empty":
                        sets.append(f"{column(col)} = ''")
                    else:
                        sets.append(f"{column(col)} = %s")
                        params.append(f"deleted-tenant-{t.id}")
                n = self.conn.execute(f"UPDATE {ident(table.name)} SET {', '.join(sets)} WHERE {cond.sql}",
                                      (*params, *cond.params)).rowcount
                done[table.name] = {"rows": n, "columns": dict(table.minimise)}
        return {"summary": "minimised " + (", ".join(f"{k} ({v['rows']} rows)" for k, v in done.items()) or "nothing"),
                "tables": done}

    def _certificate(self) -> dict[str, Any]:
        from dn import db

        t = self.p.tenant
        completed = self.conn.execute("SELECT clock_timestamp()").fetchone()[0]
        after = tenant_counts(self.conn, self.p.dm, t)
        steps = [s for s in _steps(self.conn, self.rid) if s["state"] == "done"]
        req = self.p.request
        cert = certmod.build(
            request={"id": req.id, "received_at": req.received_at, "due_at": req.due_at},
            tenant={"id": t.id, "slug": t.slug, "host": t.host}, plan=self.p.run["plan"], steps=steps,
            counts_after=after, completed_at=completed, dn_version=_dn_version())
        problems = certmod.check(cert)
        if problems:
            raise OperationFailed(f"deletion request {self.rid} cannot be certified: {'; '.join(problems)}",
                                  hint="rerun the same command", where=f"tenant:{t.slug}")
        sha = certmod.digest(cert)
        path = write_certificate(self.ctx.settings, self.rid, cert)
        self.emit("certificate", "result", str(path))
        with self.conn.transaction():
            self.conn.execute("UPDATE gdpr_runs SET certificate = %s, certificate_sha256 = %s, finished_at = %s "
                              "WHERE request_id = %s AND finished_at IS NULL", (db.jsonb(cert), sha, completed, self.rid))
            self.conn.execute("UPDATE tenants SET status = 'deleted', deleted_at = %s WHERE id = %s", (completed, t.id))
            self.conn.execute("UPDATE deletion_requests SET status = 'done', completed_at = %s WHERE id = %s",
                              (completed, self.rid))
            self._end("certificate", {"summary": f"certificate {sha[:16]}… written", "sha256": sha, "file": str(path)})
        self.emit("certificate", "done", str(path))
        return {"certificate": cert, "sha256": sha, "file": str(path)}


def write_certificate(settings: "Settings", request_id: int, cert: Mapping[str, Any]) -> Path:
    """Write the certificate atomically; an earlier, different certificate of the same request
    (a deletion re-run after a database restore) is kept beside it, never overwritten."""
    d = certificate_dir(settings)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = certificate_path(settings, request_id)
    data = json.dumps(cert, indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n"
    if path.exists() and path.read_bytes() != data:
        stamp = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        os.replace(path, path.with_name(f"request-{request_id}.{stamp}.json"))
    write_atomic(path, data)
    return path


# -- the command ---------------------------------------------------------------------------------
@dataclass
class Outcome:
    prepared: Prepared
    certificate: dict[str, Any] | None = None
    sha256: str | None = None
    file: str | None = None
    already_done: bool = False
    dry_run: bool = False


def delete(ctx: "Context", slug: str, request_id: int, *, dry_run: bool = False,
           confirm: Callable[[Prepared], bool] | None = None, resources: "Resources | None" = None,
           batch_size: int = BATCH_ROWS, on_event: OnEvent = _quiet, dm: dmap.DataMap | None = None) -> Outcome:
    """`dn gdpr delete`: plan, then (unless ``dry_run``) execute or resume under the tenant's lock,
    audited; a request already done returns its certificate and changes nothing."""
    from dn import audit, db
    from dn.gdpr.resources import Resources

    settings = ctx.settings
    resources = resources or Resources(ctx, progress=lambda s: on_event("", "progress", s))
    dm = dm or dmap.load()
    with db.connect(settings.database, application_name=f"dn {COMMAND} {ctx.request_id}") as conn:
        p = prepare(ctx, conn, slug, request_id, dm=dm, resources=resources)
        if p.finished:
            return Outcome(p, p.run["certificate"], p.run["certificate_sha256"],
                           str(certificate_path(settings, request_id)), already_done=True)
        if dry_run:
            return Outcome(p, dry_run=True)
        if confirm is not None and not confirm(p):
            raise InvalidInput("confirmation", "not confirmed: nothing was changed")
    # A crashed run's lock (its holder provably dead) is taken over by audit.privileged (dn.locks).
    args = {"request_id": request_id, "resumed": p.resuming}
    with audit.privileged(ctx, COMMAND, args, tenant=slug) as op:
        with db.connect(settings.database, application_name=f"dn {COMMAND} {ctx.request_id}") as conn:
            p = prepare(ctx, conn, slug, request_id, dm=dm, resources=resources)  # again, under the lock
            if p.finished:
                op.args["already_done"] = True
                return Outcome(p, p.run["certificate"], p.run["certificate_sha256"],
                               str(certificate_path(settings, request_id)), already_done=True)
            out = Deletion(ctx, conn, p, resources=resources, batch_size=batch_size, on_event=on_event).run()
        cert = out["certificate"]
        op.args.update(certificate_sha256=out["sha256"], certificate=out["file"],
                       deleted_rows=sum(c["before"] - c["after"] for c in cert["counts"].values() if c["action"] == "deleted"),
                       retained_rows=sum(c["after"] for c in cert["counts"].values() if c["action"] != "deleted"),
                       on_time=cert["on_time"])
    return Outcome(p, cert, out["sha256"], out["file"])


# -- requests and status -------------------------------------------------------------------------
def register(ctx: "Context", slug: str, received_at: datetime | None = None) -> dict[str, Any]:
    """Record a deletion request received outside the dashboard (e-mail, letter); due
    ``retention.gdpr_deadline_days`` after it was received. Audited."""
    from dn import audit, db

    check_slug(slug)
    settings = ctx.settings
    days = settings.retention.gdpr_deadline_days
    with audit.privileged(ctx, "gdpr request", {"tenant": slug}, tenant=slug) as op:
        with db.connect(settings.database, application_name="dn gdpr request") as conn, \
                db.translate_errors("registering the deletion request"):
            tenant = _tenant(conn, slug)
            if tenant.status == "deleted":
                raise InvalidInput("TENANT", f"tenant {slug} is already deleted")
            now = conn.execute("SELECT clock_timestamp()").fetchone()[0]
            received = received_at or now
            if received > now:
                raise InvalidInput("--received", "cannot be in the future")
            open_ = db.row(conn, "SELECT id, due_at FROM deletion_requests WHERE tenant_id = %s AND completed_at IS NULL "
                                 "ORDER BY id LIMIT 1", (tenant.id,))
            if open_:
                raise InvalidInput("TENANT", f"tenant {slug} already has open deletion request {open_['id']} "
                                             f"(due {open_['due_at']:%Y-%m-%d})",
                                   hint=f"carry it out: `dn gdpr delete {slug} --request-id {open_['id']}`")
            r = db.row(conn, "INSERT INTO deletion_requests (tenant_id, received_at, due_at) VALUES (%s, %s, %s) "
                             "RETURNING id, received_at, due_at", (tenant.id, received, received + timedelta(days=days)))
        op.args.update(request_id=r["id"], due_at=r["due_at"])
    return {"request_id": r["id"], "tenant": slug, "received_at": r["received_at"].isoformat(),
            "due_at": r["due_at"].isoformat()}


def status(conn: "Connection", settings: "Settings") -> dict[str, Any]:
    """Open requests with the days left, finished ones with their certificates (for `dn gdpr
    status` and `dn verify`: ``overdue`` lists open requests past their deadline)."""
    from dn import db

    with db.translate_errors("reading the deletion requests"):
        now = conn.execute("SELECT clock_timestamp()").fetchone()[0]
        rows = db.rows(conn, """
            SELECT r.id, t.slug, r.received_at, r.due_at, r.status, r.completed_at,
                   g.started_at, g.finished_at, g.certificate_sha256,
                   (SELECT array_agg(s.step ORDER BY s.position) FROM gdpr_steps s
                     WHERE s.request_id = r.id AND s.state = 'done') AS steps_done
              FROM deletion_requests r
              JOIN tenants t ON t.id = r.tenant_id
              LEFT JOIN gdpr_runs g ON g.request_id = r.id
             ORDER BY r.completed_at IS NOT NULL, r.due_at, r.id""")
    open_, finished = [], []
    for r in rows:
        base = {"request_id": r["id"], "tenant": r["slug"], "received_at": r["received_at"].isoformat(),
                "due_at": r["due_at"].isoformat()}
        if r["completed_at"] is None:
            left = planmod.days_left(r["due_at"], now)
            open_.append({**base, "status": r["status"], "days_left": left, "overdue": r["due_at"] < now,
                          "started_at": r["started_at"].isoformat() if r["started_at"] else None,
                          "steps_done": list(r["steps_done"] or [])})
        else:
            finished.append({**base, "completed_at": r["completed_at"].isoformat(),
                             "on_time": r["completed_at"] <= r["due_at"],
                             "certificate_sha256": r["certificate_sha256"],
                             "certificate": str(certificate_path(settings, r["id"])) if r["certificate_sha256"] else None})
    return {"now": now.isoformat(), "open": open_, "finished": finished,
            "overdue": [o["request_id"] for o in open_ if o["overdue"]]}
