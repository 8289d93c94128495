"""Operation locks: two privileged operations on the same tenant or host never run at once.

A lock is two things in the platform database:

- a session-level advisory lock on a key derived from the resource name, held by the holder's
  database session for as long as the operation runs; the server drops it when that session
  ends, however the process died;
- a row in ``op_locks`` naming the holder (actor, command, request id, pid, machine, since).

The second operation waits up to ``database.lock_timeout`` seconds for the advisory lock, then
fails with :class:`dn.errors.Locked` (exit code 5) naming the holder. A row whose advisory lock
nobody holds is *stale*: its holder's database session is gone.

Taking over. A stale row whose holder is *provably dead* is taken over by the next run that asks
for the lock, with an audit entry ("lock takeover") naming the dead holder and why it is dead:

- the holder ran on this machine (same host name, boot id and pid namespace) and its pid is gone,
  a zombie, or now another process (its kernel start time differs from the recorded one);
- or its process cannot be checked from here (another machine, or a row without the process
  identity) and the lock is older than ``database.lock_stale_after``.

Every dn operation converges when rerun (Pulumi up/destroy, the GDPR journal), so the rerun of
the crashed command, or any other, finishes what the dead run left. A stale row whose holder's
process is still running (its session dropped, the process did not) is never taken over: that
fails with Locked, and ``dn lock break RESOURCE`` (audited) is for a person who has looked.

Resources are ``tenant:<slug>``, ``host:<name>``, ``audit:<name>`` and ``db:<name>``. Callers
normally go through :func:`dn.audit.privileged`, which locks and audits together.
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

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


# -- processes -----------------------------------------------------------------------------------
def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def boot_id() -> str | None:
    """This machine's boot id (new at every boot), or None where the kernel does not say."""
    return _read("/proc/sys/kernel/random/boot_id")


def pid_namespace(pid: int | str = "self") -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of ``pid`` from /proc, or None if no such pid."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ")"
    rest = text.rsplit(")", 1)[-1].split()
    try:
        return rest[0], int(rest[19])
    except (IndexError, ValueError):
        return None


def pid_start(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot): with the boot id, it tells a
    process apart from a later one that got the same pid."""
    st = _stat(pid)
    return st[1] if st else None


def _started_at(ticks: int) -> float | None:
    """A start time in ticks since boot as a Unix time."""
    stat = _read("/proc/stat") or ""
    btime = next((int(ln.split()[1]) for ln in stat.splitlines() if ln.startswith("btime ")), None)
    return None if btime is None else btime + ticks / os.sysconf("SC_CLK_TCK")


def process_gone(machine: str, pid: int, *, boot: str | None = None, pid_ns: str | None = None,
                 start: int | None = None, since: float | None = None) -> str | None:
    """Why the process ``pid`` on ``machine`` is provably not running any more, or None when it
    may be (it runs, or it cannot be checked from here).

    Checkable only on this machine: same host name, and the boot id and pid namespace when they
    were recorded (a pid means nothing in another namespace or after a reboot seen from a
    container). ``start`` (ticks since boot, recorded by the holder) or else ``since`` (a Unix
    time at which the holder already ran) tell a reused pid from the holder.
    """
    if machine != socket.gethostname():
        return None
    if boot is not None and boot != boot_id():
        return None
    if pid_ns is not None and pid_ns != pid_namespace():
        return None
    if pid <= 0:
        return None
    st = _stat(pid)
    if st is None:
        return f"pid {pid} is gone on {machine}"
    state, ticks = st
    if state in ("Z", "X"):
        return f"pid {pid} on {machine} has exited (not yet reaped)"
    if start is not None:
        return f"pid {pid} on {machine} is now another process" if ticks != start else None
    if since is not None:
        began = _started_at(ticks)
        # one second of slack: the kernel's start time is in ticks, the holder's time in the file
        if began is not None and began > since + 1.0:
            return f"pid {pid} on {machine} is now another process (started after the lock was taken)"
    return None


@dataclass(frozen=True)
class Claimant:
    """Who asks for a lock."""

    actor: str
    command: str
    request_id: str
    pid: int
    machine: str
    boot_id: str | None = None
    pid_ns: str | None = None
    pid_start: int | None = None

    @classmethod
    def this_process(cls, actor: str, command: str, request_id: str) -> Claimant:
        pid = os.getpid()
        return cls(actor, command, request_id, pid, socket.gethostname(), boot_id(), pid_namespace(), pid_start(pid))


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
    boot_id: str | None = None
    pid_ns: str | None = None
    pid_start: int | None = None

    def describe(self) -> str:
        since = self.since.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return (f"{self.actor} running '{self.command}' (request {self.request_id}, pid {self.pid} on "
                f"{self.machine}) since {since} ({_ago(self.age_seconds)} ago)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["since"] = self.since.astimezone(UTC).isoformat()
        d["holder_backends"] = list(self.holder_backends)
        d["state"] = "held" if self.alive else "stale"
        return d

    def dead(self, stale_after: float | None) -> str | None:
        """Why this lock's holder is provably dead (so the lock may be taken over), or None.

        A holder whose database session is alive is alive. Otherwise its process decides when it
        can be checked from here; when it cannot, the lock's age against ``stale_after``."""
        if self.alive:
            return None
        # a row without the start time (written before dn recorded it) still has its own age
        since = self.since.timestamp() if self.pid_start is None else None
        gone = process_gone(self.machine, self.pid, boot=self.boot_id, pid_ns=self.pid_ns, start=self.pid_start,
                            since=since)
        if gone:
            return f"its database session is gone and {gone}"
        checkable = self.machine == socket.gethostname() and (self.boot_id is None or self.boot_id == boot_id()) \
            and (self.pid_ns is None or self.pid_ns == pid_namespace())
        if checkable:
            return None  # the process still runs: its session dropped, it did not
        if stale_after is not None and self.age_seconds > stale_after:
            return (f"its database session is gone, its process cannot be checked from here, and the lock is "
                    f"{_ago(self.age_seconds)} old (database.lock_stale_after: {_ago(stale_after)})")
        return None


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
       l.boot_id, l.pid_ns, l.pid_start,
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


def list_locks(conn: Connection) -> list[Holder]:
    """Every recorded lock, oldest first, with whether its holder is alive."""
    from dn import db

    with db.translate_errors("listing locks"):
        return [_holder_from(r) for r in db.rows(conn, _HOLDERS_SQL + " ORDER BY l.acquired_at, l.resource")]


def holder(conn: Connection, res: str) -> Holder | None:
    from dn import db

    r = db.row(conn, _HOLDERS_SQL + " WHERE l.resource = %s", (res,))
    return _holder_from(r) if r else None


def _stale_error(h: Holder) -> Locked:
    return Locked(
        f"{h.resource} is locked by a run whose database session is gone but which cannot be proved dead "
        f"(its process may still be running): {h.describe()}",
        hint=f"stop that process if it still runs, or look at what it left (`dn audit show --since 1d`); then "
             f"`dn lock break {h.resource}` and rerun",
        where=h.resource)


OnTakeover = Callable[[Holder, str], None]


def acquire(conn: Connection, resources: Iterable[str], claimant: Claimant, timeout: float, *,
            stale_after: float | None = None, on_takeover: OnTakeover | None = None) -> list[str]:
    """Take the locks on ``resources`` (in sorted order, so two runs never deadlock) for this
    connection's session. Waits up to ``timeout`` seconds in total; raises Locked naming the holder.

    A stale lock whose holder is provably dead (:meth:`Holder.dead`) is taken over when
    ``on_takeover`` is given: it is called with the dead holder and the reason first (it writes the
    audit entry; if it raises, nothing was taken over), then the holder's row is replaced by ours.
    Without ``on_takeover``, or when the holder cannot be proved dead, a stale lock is refused."""
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
                    # (the row now shows our own session as its holder's: judge it without)
                    stale = replace(stale, alive=False, holder_backends=())
                    why = stale.dead(stale_after) if on_takeover is not None else None
                    if why is None:
                        db.advisory_unlock(conn, key)
                        raise _stale_error(stale)
                    try:
                        on_takeover(stale, why)  # audited before anything changes
                        conn.execute("DELETE FROM op_locks WHERE resource = %s AND request_id = %s",
                                     (res, stale.request_id))
                    except BaseException:
                        if not conn.closed:
                            db.advisory_unlock(conn, key)
                        raise
                conn.execute(
                    "INSERT INTO op_locks (resource, lock_key, actor, command, request_id, pid, machine, backend_pid,"
                    " boot_id, pid_ns, pid_start)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, pg_backend_pid(), %s, %s, %s)",
                    (res, key, claimant.actor, claimant.command, claimant.request_id, claimant.pid, claimant.machine,
                     claimant.boot_id, claimant.pid_ns, claimant.pid_start))
                taken.append(res)
    except BaseException:
        if taken and not conn.closed:
            release(conn, taken, claimant.request_id)
        raise
    return taken


def release(conn: Connection, resources: Iterable[str], request_id: str) -> None:
    """Drop our rows, then our advisory locks (in that order: the row is gone before the next
    holder can take the lock, so it never looks stale)."""
    from dn import db

    with db.translate_errors("releasing a lock"):
        for res in sorted(set(resources), reverse=True):
            conn.execute("DELETE FROM op_locks WHERE resource = %s AND request_id = %s", (res, request_id))
            db.advisory_unlock(conn, lock_key(res))


def forget(conn: Connection, request_id: str) -> int:
    """Remove the rows of our own run after its session was lost (its advisory locks died with it)."""
    from dn import db

    with db.translate_errors("releasing a lock"):
        return conn.execute("DELETE FROM op_locks WHERE request_id = %s AND pid = %s AND machine = %s",
                            (request_id, os.getpid(), socket.gethostname())).rowcount


def break_lock(conn: Connection, res: str) -> Holder:
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
