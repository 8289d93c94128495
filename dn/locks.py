"""Operation locks: two privileged operations on the same tenant or host never run at once.

A lock is two things in the platform database:

- a session-level advisory lock on a key derived from the resource name, held by the holder's
  database session for as long as the operation runs; the server drops it when that session
  ends, however the process died;
- a row in ``op_locks`` naming the holder (actor, command, request id, pid, machine, since).

The second operation waits up to ``database.lock_timeout`` seconds for the advisory lock, then
fails with :class:`dn.errors.Locked` (exit code 5) naming the holder. A row whose advisory lock
nobody holds was left by a run that died mid-way: that lock is *stale*. dn does not silently take
it over, because the dead run may have left a half-applied change; ``dn lock list`` shows it and
``dn lock break RESOURCE`` (audited) removes it once someone has looked.

Resources are ``tenant:<slug>``, ``host:<name>``, ``audit:<name>`` and ``db:<name>``. Callers
normally go through :func:`dn.audit.privileged`, which locks and audits together.
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Iterable

from dn.errors import InvalidInput, Locked, OperationFailed

if TYPE_CHECKING:
    from dn.db import Connection

KINDS = ("tenant", "host", "audit", "db")
RESOURCE_RE = re.compile(r"^(tenant|host|audit|db):[a-z0-9][a-z0-9-]{0,62}$")


def resource(kind: str, name: str) -> str:
    """``tenant:acme`` from ("tenant", "acme"); the name is validated."""
    return parse_resource(f"{kind}:{name}", field=kind)


def parse_resource(text: str, field: str = "RESOURCE") -> str:
    if not RESOURCE_RE.match(text or ""):
        raise InvalidInput(field, f"{text!r} is not a lock resource: expected KIND:NAME with KIND one of "
                                  f"{', '.join(KINDS)} and NAME of [a-z0-9-] (e.g. tenant:acme, host:eu1)")
    return text


def lock_key(res: str) -> int:
    """The advisory lock key of a resource: the first 8 bytes of a SHA-256, as a signed bigint."""
    return int.from_bytes(hashlib.sha256(b"dn-lock\0" + res.encode()).digest()[:8], "big", signed=True)


@dataclass(frozen=True)
class Claimant:
    """Who asks for a lock."""

    actor: str
    command: str
    request_id: str
    pid: int
    machine: str

    @classmethod
    def this_process(cls, actor: str, command: str, request_id: str) -> "Claimant":
        return cls(actor, command, request_id, os.getpid(), socket.gethostname())


@dataclass(frozen=True)
class Holder:
    """A held lock as recorded in op_locks, and whether its holder is still alive."""

    resource: str
    actor: str
    command: str
    request_id: str
    pid: int
    machine: str
    backend_pid: int
    since: datetime
    age_seconds: float
    alive: bool
    holder_backends: tuple[int, ...]

    def describe(self) -> str:
        since = self.since.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return (f"{self.actor} running '{self.command}' (request {self.request_id}, pid {self.pid} on "
                f"{self.machine}) since {since} ({_ago(self.age_seconds)} ago)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["since"] = self.since.astimezone(timezone.utc).isoformat()
        d["holder_backends"] = list(self.holder_backends)
        d["state"] = "held" if self.alive else "stale"
        return d


def _ago(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


# The advisory lock of a row is visible in pg_locks as classid = high 32 bits, objid = low 32 bits.
_HOLDERS_SQL = """
SELECT l.resource, l.actor, l.command, l.request_id, l.pid, l.machine, l.backend_pid,
       l.acquired_at AS since,
       extract(epoch FROM clock_timestamp() - l.acquired_at)::float8 AS age_seconds,
       coalesce((SELECT array_agg(p.pid ORDER BY p.pid) FROM pg_locks p
                  WHERE p.locktype = 'advisory' AND p.granted AND p.objsubid = 1
                    AND p.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                    AND p.classid::bigint = ((l.lock_key >> 32) & 4294967295)
                    AND p.objid::bigint = (l.lock_key & 4294967295)), '{}') AS holder_backends
  FROM op_locks l
"""


def _holder_from(r: dict[str, Any]) -> Holder:
    backends = tuple(r.pop("holder_backends") or ())
    return Holder(**r, alive=bool(backends), holder_backends=backends)


def list_locks(conn: "Connection") -> list[Holder]:
    """Every recorded lock, oldest first, with whether its holder is alive."""
    from dn import db

    with db.translate_errors("listing locks"):
        return [_holder_from(r) for r in db.rows(conn, _HOLDERS_SQL + " ORDER BY l.acquired_at, l.resource")]


def holder(conn: "Connection", res: str) -> Holder | None:
    from dn import db

    r = db.row(conn, _HOLDERS_SQL + " WHERE l.resource = %s", (res,))
    return _holder_from(r) if r else None


def _stale_error(h: Holder) -> Locked:
    return Locked(
        f"{h.resource} is locked by a run that is no longer alive: {h.describe()}",
        hint=f"look at what it left (`dn audit show --since 1d`), then `dn lock break {h.resource}` and rerun",
        where=h.resource)


def acquire(conn: "Connection", resources: Iterable[str], claimant: Claimant, timeout: float) -> list[str]:
    """Take the locks on ``resources`` (in sorted order, so two runs never deadlock) for this
    connection's session. Waits up to ``timeout`` seconds in total; raises Locked naming the holder."""
    from dn import db

    wanted = sorted({parse_resource(r) for r in resources})
    deadline = time.monotonic() + timeout
    taken: list[str] = []
    try:
        with db.translate_errors("taking a lock"):
            for res in wanted:
                key = lock_key(res)
                got = db.try_advisory_lock(conn, key)
                if not got:
                    h = holder(conn, res)
                    if h and (h.request_id, h.pid, h.machine) == (claimant.request_id, claimant.pid, claimant.machine):
                        raise OperationFailed(
                            f"{res} is already locked by this same operation ('{h.command}')",
                            hint="an operation nested inside another on the same resource must not lock again",
                            where=res)
                    got = db.advisory_lock(conn, key, deadline - time.monotonic())
                if not got:
                    h = holder(conn, res)
                    if h is None:
                        pids = db.advisory_holders(conn, key)
                        raise Locked(f"{res} is locked by another dn run that is starting (database session "
                                     f"{', '.join(map(str, pids)) or '?'}); waited {timeout:g}s",
                                     hint="rerun in a moment; `dn lock list` shows the holders", where=res)
                    raise Locked(f"{res} is locked by {h.describe()}; waited {timeout:g}s",
                                 hint="wait for it to finish and rerun; if it crashed, see `dn lock list`",
                                 where=res)
                stale = holder(conn, res)
                if stale is not None:
                    # We hold the advisory lock, so the row's own session is gone.
                    db.advisory_unlock(conn, key)
                    raise _stale_error(stale)
                conn.execute(
                    "INSERT INTO op_locks (resource, lock_key, actor, command, request_id, pid, machine, backend_pid)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, pg_backend_pid())",
                    (res, key, claimant.actor, claimant.command, claimant.request_id, claimant.pid, claimant.machine))
                taken.append(res)
    except BaseException:
        if taken and not conn.closed:
            release(conn, taken, claimant.request_id)
        raise
    return taken


def release(conn: "Connection", resources: Iterable[str], request_id: str) -> None:
    """Drop our rows, then our advisory locks (in that order: the row is gone before the next
    holder can take the lock, so it never looks stale)."""
    from dn import db

    with db.translate_errors("releasing a lock"):
        for res in sorted(set(resources), reverse=True):
            conn.execute("DELETE FROM op_locks WHERE resource = %s AND request_id = %s", (res, request_id))
            db.advisory_unlock(conn, lock_key(res))


def forget(conn: "Connection", request_id: str) -> int:
    """Remove the rows of our own run after its session was lost (its advisory locks died with it)."""
    from dn import db

    with db.translate_errors("releasing a lock"):
        return conn.execute("DELETE FROM op_locks WHERE request_id = %s AND pid = %s AND machine = %s",
                            (request_id, os.getpid(), socket.gethostname())).rowcount


def break_lock(conn: "Connection", res: str) -> Holder:
    """Remove a stale lock. A lock whose holder is alive is never broken (raises Locked)."""
    from dn import db

    res = parse_resource(res)
    with db.translate_errors("breaking a lock"):
        h = holder(conn, res)
        if h is None:
            raise InvalidInput("RESOURCE", f"no lock is recorded on {res}; `dn lock list` shows the locks")
        if h.alive:
            raise Locked(f"{res} is held by a live run: {h.describe()}",
                         hint="a live lock is never broken: wait for the run to finish or stop it first",
                         where=res)
        key = lock_key(res)
        if not db.try_advisory_lock(conn, key):
            raise Locked(f"{res} was taken by another run just now", hint="`dn lock list`", where=res)
        try:
            conn.execute("DELETE FROM op_locks WHERE resource = %s AND request_id = %s", (res, h.request_id))
        finally:
            db.advisory_unlock(conn, key)
    return h
