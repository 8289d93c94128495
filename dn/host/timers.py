"""dn's systemd timers on an EU host, applied over SSH: one backup timer per tenant, and the
host's own (platform backup, health check every 60 s, verify, drill, retention).

An apply installs the units (``dn.render.systemd``) under ``<prefix>/etc/systemd/system`` in one
``dn.ssh`` transaction whose check is ``systemd-analyze verify`` of the installed files (where
the host has it; a warning about one of dn's files counts as a failure): a unit systemd would
refuse never stays in place. Then, when systemd runs the host (``/run/systemd/system`` exists)
and the units are in its unit path (prefix ``/``): ``systemctl daemon-reload`` and
``enable --now`` of each timer. Elsewhere (the sandbox, which has no systemd) the verified units
stay installed and the plan says that they were not enabled.

Removal disables the timers first (where systemd runs), then removes the units.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dn.config import ScheduleConfig
from dn.host.files import drop_stale_backups
from dn.host.plan import Applied, ApplyRefused, Change, Plan, Progress, file_changes, no_progress
from dn.models import HostBaseline, TenantSpec
from dn.render import systemd as rs

if TYPE_CHECKING:
    from dn.ssh import Session


@dataclass(frozen=True)
class TimerSet:
    """Units applied together: ``files`` (on-host path → content, ``None``: must not exist) and
    the timers to enable."""

    name: str
    files: dict[str, bytes | None]
    timers: tuple[str, ...]

    @property
    def removal(self) -> bool:
        return all(v is None for v in self.files.values())

    def without(self) -> "TimerSet":
        """The removal of this set."""
        return TimerSet(self.name, {p: None for p in self.files}, self.timers)


def _set(name: str, host: HostBaseline, jobs: list[rs.Job]) -> TimerSet:
    files: dict[str, bytes | None] = {}
    for job in jobs:
        files.update({p: t.encode() for p, t in rs.render_job(job, host).items()})
    return TimerSet(name, files, tuple(f"{j.unit}.timer" for j in jobs))


def tenant_timers(host: HostBaseline, tenant: TenantSpec, schedules: ScheduleConfig | None = None) -> TimerSet:
    """The tenant's backup service and timer."""
    job = rs.jobs(host, [tenant], schedules or ScheduleConfig())[0]
    return _set(f"tenant {tenant.slug}", host, [job])


def host_timers(host: HostBaseline, schedules: ScheduleConfig) -> TimerSet:
    """The host's own jobs: platform backup, health check, verify, drill, retention."""
    return _set("host", host, rs.jobs(host, [], schedules))


@dataclass(frozen=True)
class TimerState:
    files: dict[str, bytes | None]
    systemd: bool  # systemd runs the host and the units are in its unit path
    analyze: bool  # systemd-analyze is available
    enabled: dict[str, bool]  # timer → enabled and active (known only where systemd runs)
    why_not: str = ""  # why timers are not enabled here


def plan(ts: TimerSet, state: TimerState, *, where: str = "host") -> Plan:
    """The changes that bring the host to ``ts`` (pure)."""
    changes = file_changes(ts.files, state.files)
    notes = []
    if state.systemd:
        if ts.removal:
            disable = [t for t in ts.timers if state.enabled.get(t)]
            changes = [Change("disable", t, "enabled") for t in disable] + changes
            if changes:
                changes.append(Change("daemon-reload", "systemd", "units removed"))
        else:
            if changes:
                changes.append(Change("daemon-reload", "systemd", "units changed"))
            changes += [Change("enable", t, "not enabled and started") for t in ts.timers if not state.enabled.get(t)]
    elif not ts.removal:
        notes.append(f"timers not enabled: {state.why_not}; the units are installed and verified")
    if not state.analyze and not ts.removal and changes:
        notes.append("systemd-analyze is not available on this host: the units are not verified")
    return Plan(f"timers {ts.name} on {where}", tuple(changes), tuple(notes))


def _systemd(s: "Session", host: HostBaseline) -> tuple[bool, str]:
    if host.prefix != "/":
        return False, f"the units live under the host prefix {host.prefix}, outside systemd's unit path"
    if s.run(["test", "-d", "/run/systemd/system"], check=False).rc != 0:
        return False, "systemd is not running on this host"
    return True, ""


def read(session: "Session", host: HostBaseline, ts: TimerSet) -> TimerState:
    s = session
    files = {p: (s.read_file(p) if s.exists(p) else None) for p in ts.files}
    running, why = _systemd(s, host)
    analyze = s.run(["systemd-analyze", "--version"], check=False).rc == 0
    enabled = {}
    if running:
        for t in ts.timers:
            en = s.run(["systemctl", "is-enabled", "--quiet", t], check=False).rc == 0
            act = s.run(["systemctl", "is-active", "--quiet", t], check=False).rc == 0
            enabled[t] = en and act
    return TimerState(files, running, analyze, enabled, why)


def verify_argv(paths: list[str]) -> list[str]:
    return ["systemd-analyze", "verify", "--man=no", *paths]


def _verify(s: "Session", paths: list[str]) -> None:
    r = s.run(verify_argv(paths), check=False)
    err = r.stderr.decode("utf-8", "replace")
    ours = [line for line in err.splitlines() if any(posixpath.basename(p) in line for p in paths)]
    if r.rc != 0 or ours:
        raise ApplyRefused(f"{s.where}: systemd-analyze verify refused dn's units (exit {r.rc}): "
                           + " | ".join(ours or err.strip().splitlines())[-1500:])


def apply(session: "Session", host: HostBaseline, ts: TimerSet, the_plan: Plan, state: TimerState,
          progress: Progress = no_progress) -> Applied:
    """Carry out ``the_plan``; a unit that fails verification is never left in place."""
    s = session
    done = Applied(the_plan, list(the_plan.notes))
    if the_plan.empty:
        return done
    for t in the_plan.targets("disable"):
        progress("disable")
        s.run(["systemctl", "disable", "--now", t])
    installed = [p for p, v in ts.files.items() if v is not None]

    def check(sess: "Session") -> None:
        if state.analyze and installed:
            progress("verify")
            _verify(sess, installed)

    progress("upload")
    unit_dir = host.path(rs.UNIT_DIR)
    if not ts.removal:
        s.mkdir_p(unit_dir)
    tx = s.transaction(check=check)
    tx.stage(ts.files)
    if tx.pending:
        progress("swap")
        tx.commit()
    else:
        tx.abort()
    if the_plan.has("daemon-reload"):
        progress("daemon-reload")
        s.run(["systemctl", "daemon-reload"])
    for t in the_plan.targets("enable"):
        progress("enable")
        s.run(["systemctl", "enable", "--now", t])
    drop_stale_backups(s, ts.files)
    progress("done")
    return done


def converge(session: "Session", host: HostBaseline, ts: TimerSet, progress: Progress = no_progress) -> Applied:
    """read → plan → apply."""
    state = read(session, host, ts)
    return apply(session, host, ts, plan(ts, state, where=session.where), state, progress)


def remove(session: "Session", host: HostBaseline, ts: TimerSet, progress: Progress = no_progress) -> Applied:
    """Disable (where systemd runs) and remove the set's units."""
    return converge(session, host, ts.without(), progress)
