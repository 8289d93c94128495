"""nginx on an EU host, applied over SSH: the base config (one per host) and one vhost per tenant.

Two kinds of *unit* are applied, each on its own: the base (``nginx.conf`` and the DH group) and a
tenant's vhost file (which carries the tenant's rate-limit zones, see ``dn.render.nginx``). One
tenant's apply writes one file and nothing another tenant depends on.

An apply (``apply``, after ``read`` and the pure ``plan``):

1. ``upload``: every changed file is written to a temp file next to its target (``dn.ssh``
   transaction: mode set before any byte, fsynced);
2. ``swap``: each is renamed over its target, the previous version kept aside;
3. ``validate``: ``nginx -t`` on the real configuration tree, the new files in place;
4. ``reload`` (or ``start`` when nginx is not running): ``nginx -s reload`` with the host's
   ``-p/-e/-c``, then the reload is checked: the master is still alive, new worker processes
   replaced the old ones, and the error log shows no ``[emerg]``/``[alert]`` since the signal.
   nginx refuses some changes only at reload (a shared zone rebound to another size), so ``-t``
   alone is not enough;
5. on any failure in 3-4 every previous file is put back and nginx is reloaded onto them (and
   checked the same way): it keeps serving the previous configuration.

After a successful reload dn records the digest of the unit's files in
``<data_dir>/nginx/<unit>.loaded`` on the host. A rerun whose files are already on disk but whose
digest was never recorded (the connection dropped between the swap and the reload) therefore
still validates and reloads: the host converges. Nothing changed and digest recorded: no reload.

Callers hold the host's lock (``dn.audit.privileged``) so that two applies never interleave.
"""
from __future__ import annotations

import posixpath
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dn.errors import OperationFailed
from dn.host.files import drop_stale_backups
from dn.host.plan import Applied, ApplyRefused, Change, Plan, Progress, digest, file_changes, no_progress
from dn.models import HostBaseline, TenantSpec
from dn.render import nginx as rn

if TYPE_CHECKING:
    from dn.ssh import Session

RELOAD_TIMEOUT = 15.0  # seconds for new workers to appear after a reload
START_TIMEOUT = 15.0
STOP_TIMEOUT = 30.0
POLL = 0.1
BASE = "base"
ERROR_MARKS = ("[emerg]", "[alert]")


# --------------------------------------------------------------------------- units (pure)


@dataclass(frozen=True)
class Unit:
    """What one apply manages: ``files`` (on-host path → content; ``None``: must not exist) and
    ``requires``, files that must already exist on the host (certificates, the base config)."""

    name: str
    files: dict[str, bytes | None]
    requires: tuple[str, ...] = ()

    @property
    def removal(self) -> bool:
        return all(v is None for v in self.files.values())

    @property
    def digest(self) -> str:
        return digest(self.files)


def marker_path(host: HostBaseline, unit: str) -> str:
    """Where the digest of a unit's last successfully loaded files is recorded on the host."""
    return host.path(f"{host.data_dir.rstrip('/')}/nginx/{unit}.loaded")


def base_unit(host: HostBaseline) -> Unit:
    """The host's nginx main config and DH group."""
    return Unit(BASE, {p: text.encode() for p, text in rn.render_base(host).items()})


def vhost_unit_name(tenant: TenantSpec) -> str:
    return f"vhost-{tenant.slug}"


def vhost_unit(host: HostBaseline, tenant: TenantSpec) -> Unit:
    """One tenant's vhost file; it needs the tenant's certificate and the base config in place."""
    cert, key = rn.cert_paths(host, tenant)
    return Unit(vhost_unit_name(tenant), {rn.vhost_path(host, tenant): rn.render_vhost(tenant, host).encode()},
                requires=(cert, key, marker_path(host, BASE)))


def vhost_removal(host: HostBaseline, tenant: TenantSpec) -> Unit:
    """The removal of one tenant's vhost."""
    return Unit(vhost_unit_name(tenant), {rn.vhost_path(host, tenant): None})


# --------------------------------------------------------------------------- processes (pure)


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    args: str


def parse_ps(text: str) -> list[Proc]:
    """Parse ``ps -e -o pid=,ppid=,args=`` output."""
    out = []
    for line in text.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
            out.append(Proc(int(parts[0]), int(parts[1]), parts[2] if len(parts) > 2 else ""))
    return out


def master_of(procs: list[Proc], pid: int | None) -> int | None:
    """``pid`` if it is a live nginx master process."""
    if pid is None:
        return None
    for p in procs:
        if p.pid == pid and p.args.startswith("nginx: master process"):
            return pid
    return None


def serving_workers(procs: list[Proc], master: int) -> set[int]:
    """Workers of ``master`` that serve requests (not those finishing after a reload)."""
    return {p.pid for p in procs if p.ppid == master and p.args.startswith("nginx: worker process")
            and "shutting down" not in p.args}


def log_errors(text: str) -> list[str]:
    """The emerg/alert lines of an nginx error log excerpt."""
    return [line.strip() for line in text.splitlines() if any(m in line for m in ERROR_MARKS)]


# --------------------------------------------------------------------------- state and plan


@dataclass(frozen=True)
class NginxState:
    """What the host has: the unit's files, the recorded digest, the running master, and which of
    the unit's required files are missing."""

    files: dict[str, bytes | None]
    loaded: str | None
    master: int | None
    missing: tuple[str, ...] = ()
    workers: tuple[int, ...] = field(default=())


def plan(unit: Unit, state: NginxState, *, where: str = "nginx") -> Plan:
    """The changes that bring the host to ``unit`` (pure)."""
    changes = file_changes(unit.files, state.files)
    notes = []
    if unit.removal:
        if state.master is not None and (changes or state.loaded is not None):
            changes.append(Change("reload", "nginx", "to stop serving the removed files"))
        elif state.loaded is not None and not changes:
            changes.append(Change("forget", unit.name, "the removal is done; its load record remains"))
    elif state.master is None:
        changes.append(Change("start", "nginx", "nginx is not running"))
    elif changes:
        changes.append(Change("reload", "nginx", "to load the changed files"))
    elif state.loaded != unit.digest:
        changes.append(Change("reload", "nginx", "the files on disk were never loaded (an earlier apply "
                                                 "stopped before its reload)"))
    if changes and state.missing:
        notes.append("missing on the host: " + ", ".join(state.missing))
    return Plan(f"nginx {unit.name} on {where}", tuple(changes), tuple(notes))


def _ps(s: Session) -> list[Proc]:
    return parse_ps(s.run(["ps", "-e", "-o", "pid=,ppid=,args="]).text)


def _master(s: Session, host: HostBaseline, procs: list[Proc] | None = None) -> int | None:
    pid_file = rn.pid_path(host)
    if not s.exists(pid_file):
        return None
    text = s.read_file(pid_file).decode("ascii", "replace").strip()
    if not text.isdigit():
        return None
    return master_of(_ps(s) if procs is None else procs, int(text))


def read(session: Session, host: HostBaseline, unit: Unit) -> NginxState:
    """The current state of ``unit`` on the host."""
    s = session
    files = {p: (s.read_file(p) if s.exists(p) else None) for p in unit.files}
    marker = marker_path(host, unit.name)
    loaded = s.read_file(marker).decode("ascii", "replace").strip() if s.exists(marker) else None
    procs = _ps(s)
    master = _master(s, host, procs)
    missing = tuple(p for p in unit.requires if not s.exists(p))
    workers = tuple(sorted(serving_workers(procs, master))) if master else ()
    return NginxState(files, loaded or None, master, missing, workers)


# --------------------------------------------------------------------------- apply


def _log_size(s: Session, host: HostBaseline) -> int:
    st = s.stat(rn.error_log_path(host))
    return int(st.st_size or 0) if st is not None else 0


def _log_since(s: Session, host: HostBaseline, offset: int) -> str:
    path = rn.error_log_path(host)
    if not s.exists(path):
        return ""
    return s.run(["tail", "-c", f"+{offset + 1}", path]).text


def _reload(s: Session, host: HostBaseline, master: int) -> None:
    """Signal a reload and wait until it took effect; raise ApplyRefused if it did not."""
    before = serving_workers(_ps(s), master)
    offset = _log_size(s, host)
    r = s.run(rn.control_argv(host, "reload"), check=False)
    if r.rc != 0:
        raise ApplyRefused(f"{s.where}: `{' '.join(rn.control_argv(host, 'reload'))}` failed (exit {r.rc}): "
                          f"{r.stderr.decode('utf-8', 'replace').strip()[-800:]}")
    deadline = time.monotonic() + RELOAD_TIMEOUT
    while True:
        errors = log_errors(_log_since(s, host, offset))
        if errors:
            raise ApplyRefused(f"{s.where}: nginx refused the reload and keeps its previous configuration: "
                              + " | ".join(errors)[-1200:])
        procs = _ps(s)
        if master_of(procs, master) is None:
            raise ApplyRefused(f"{s.where}: the nginx master (pid {master}) exited during the reload")
        now = serving_workers(procs, master)
        if now and not (now & before):
            return
        if time.monotonic() > deadline:
            raise ApplyRefused(f"{s.where}: nginx did not replace its worker processes within "
                              f"{RELOAD_TIMEOUT:g}s of the reload signal")
        time.sleep(POLL)


def _start(s: Session, host: HostBaseline) -> None:
    """Start nginx on the host's configuration and wait until it serves."""
    offset = _log_size(s, host)
    r = s.run(rn.control_argv(host), check=False)
    if r.rc != 0:
        raise ApplyRefused(f"{s.where}: nginx did not start (exit {r.rc}): "
                          f"{r.stderr.decode('utf-8', 'replace').strip()[-800:]}")
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        procs = _ps(s)
        master = _master(s, host, procs)
        if master and serving_workers(procs, master):
            return
        errors = log_errors(_log_since(s, host, offset))
        if errors or time.monotonic() > deadline:
            raise ApplyRefused(f"{s.where}: nginx did not come up within {START_TIMEOUT:g}s"
                              + (": " + " | ".join(errors)[-1200:] if errors else ""))
        time.sleep(POLL)


def _validate(s: Session, host: HostBaseline) -> None:
    r = s.run(rn.check_argv(host), check=False)
    if r.rc != 0:
        out = (r.stderr + r.stdout).decode("utf-8", "replace").strip()[-1500:]
        raise ApplyRefused(f"{s.where}: nginx -t refused the configuration: {out}")


def _dirs(host: HostBaseline, unit: Unit) -> list[str]:
    dirs = list(rn.runtime_dirs(host))
    dirs += [posixpath.dirname(p) for p in unit.files]
    dirs.append(posixpath.dirname(marker_path(host, unit.name)))
    return list(dict.fromkeys(dirs))


def apply(session: Session, host: HostBaseline, unit: Unit, the_plan: Plan,
          progress: Progress = no_progress) -> Applied:
    """Carry out ``the_plan`` for ``unit``; on failure the previous files are back and nginx
    serves them. Raises dn.ssh.CheckFailed (nginx refused; everything restored), ApplyRefused (nginx refused
    a reload of files already in place; it keeps its previous configuration), RollbackIncomplete or
    Unreachable (the connection dropped: each file is whole; rerun), OperationFailed."""
    s = session
    done = Applied(the_plan)
    if the_plan.empty:
        return done
    if not unit.removal:
        missing = [p for p in unit.requires if not s.exists(p)]
        if missing:
            base_missing = marker_path(host, BASE) in missing
            raise OperationFailed(
                f"{s.where}: cannot apply nginx {unit.name}: missing on the host: {', '.join(missing)}",
                hint=("apply the host baseline first (dn host up): the base nginx config is not in place"
                      if base_missing else
                      f"install the certificate and key under {host.path(host.cert_dir)} (<first domain>.crt/.key), then rerun"),
            )
    if the_plan.has("forget") and len(the_plan.changes) == 1:
        s.remove(marker_path(host, unit.name))
        return done
    for d in _dirs(host, unit):
        s.mkdir_p(d)
    running_before = _master(s, host) is not None

    def activate(sess: Session) -> None:
        progress("validate")
        _validate(sess, host)
        master = _master(sess, host)
        if master is not None:
            progress("reload")
            _reload(sess, host, master)
        elif not unit.removal:
            progress("start")
            _start(sess, host)

    def back_to_previous(sess: Session) -> None:
        # The previous files are back in place: make the running nginx serve exactly them.
        progress("rollback")
        master = _master(sess, host)
        if master is not None:
            _reload(sess, host, master)
        elif running_before:
            _start(sess, host)

    progress("upload")
    tx = s.transaction(check=activate, on_rollback=back_to_previous)
    tx.stage(unit.files)
    if tx.pending:
        progress("swap")
        tx.commit()
    else:
        tx.abort()
        activate(s)
    marker = marker_path(host, unit.name)
    if unit.removal:
        from dn.ssh import PREV_MARK

        for path in unit.files:  # a removed file's kept previous version goes with it
            d, name = posixpath.split(path)
            s.remove(f"{d}/.{name}{PREV_MARK}")
        s.remove(marker)
    else:
        s.install_file(marker, (unit.digest + "\n").encode(), mode=0o644, keep_previous=False)
    drop_stale_backups(s, unit.files)
    progress("done")
    return done


def converge(session: Session, host: HostBaseline, unit: Unit, progress: Progress = no_progress) -> Applied:
    """read → plan → apply for one unit."""
    state = read(session, host, unit)
    return apply(session, host, unit, plan(unit, state, where=session.where), progress)


def ensure_base(session: Session, host: HostBaseline, progress: Progress = no_progress) -> Applied:
    """Bring the host's base nginx config in place and nginx running on it."""
    return converge(session, host, base_unit(host), progress)


def ensure_vhost(session: Session, host: HostBaseline, tenant: TenantSpec,
                 progress: Progress = no_progress) -> Applied:
    """Bring one tenant's vhost in place and loaded."""
    return converge(session, host, vhost_unit(host, tenant), progress)


def remove_vhost(session: Session, host: HostBaseline, tenant: TenantSpec,
                 progress: Progress = no_progress) -> Applied:
    """Remove one tenant's vhost and reload nginx without it."""
    return converge(session, host, vhost_removal(host, tenant), progress)


def served_vhosts(session: Session, host: HostBaseline) -> list[str]:
    """Names of the vhost files on the host (tenant slugs)."""
    d = host.path(rn.VHOST_DIR)
    if not session.exists(d):
        return []
    return [n[:-5] for n in session.listdir(d) if n.endswith(".conf") and not n.startswith(".")]


def remove_base(session: Session, host: HostBaseline, progress: Progress = no_progress) -> Applied:
    """Stop nginx and remove dn's base config. Refused while any tenant vhost remains."""
    s = session
    left = served_vhosts(s, host)
    if left:
        raise OperationFailed(f"{s.where}: nginx still serves tenants ({', '.join(left)}); "
                              "remove their vhosts before the base config",
                              hint="destroy those tenants' stacks first")
    unit = base_unit(host)
    master = _master(s, host)
    changes = [Change("stop", "nginx", "the base config is being removed")] if master else []
    changes += [Change("delete", p, "no longer wanted") for p in unit.files if s.exists(p)]
    the_plan = Plan(f"nginx {BASE} on {s.where}", tuple(changes))
    if master:
        progress("stop")
        s.run(rn.control_argv(host, "quit"))
        deadline = time.monotonic() + STOP_TIMEOUT
        while master_of(_ps(s), master) is not None:
            if time.monotonic() > deadline:
                raise OperationFailed(f"{s.where}: nginx (pid {master}) did not stop within {STOP_TIMEOUT:g}s")
            time.sleep(POLL)
    progress("delete")
    for p in unit.files:
        s.remove(p)
    s.remove(marker_path(host, BASE))
    return Applied(the_plan)
