"""systemd services and timers that run dn's scheduled jobs on an EU host (``templates/systemd/``).

Units (in ``/etc/systemd/system`` under the host prefix), each a oneshot service plus its timer:

=========================  ==================================  ===================================
unit                       runs                                when
=========================  ==================================  ===================================
dn-backup-<slug>           dn backup run --tenant <slug>       the tenant's ``backup_schedule``
dn-backup-platform         dn backup run --platform            ``settings.schedules.backup``
dn-health                  dn health check --alert-after N     every 60 s (OnUnitActiveSec)
dn-verify                  dn verify                           ``settings.schedules.verify`` (daily)
dn-drill                   dn dr drill                         ``settings.schedules.drill`` (monthly)
dn-retention               dn retention enforce                ``settings.schedules.retention``
=========================  ==================================  ===================================

Calendar timers are ``Persistent=true`` so a run missed while the host was down happens at boot.
Services are hardened: NoNewPrivileges, ProtectSystem=strict with only dn's data dir (and, for
backups and drills, the tenant volume tree) writable, ProtectHome=read-only, PrivateTmp, kernel,
clock, hostname and cgroup protection, no SUID/SGID, native syscalls only, UMask 0077. The drill
keeps devices and namespaces (it opens LUKS volumes and starts scratch containers).
Every OnCalendar value is checked with ``dn.models.check_oncalendar`` first.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dn.config import ScheduleConfig
from dn.errors import InvalidInput
from dn.models import HostBaseline, TenantSpec, check_oncalendar
from dn.render import environment, sd_line

UNIT_DIR = "/etc/systemd/system"
HEALTH_INTERVAL_S = 60  # the trust page: "measured by an automatic health-check every 60s"
TENANT_VOLUMES = "/srv/dn/tenants"


@dataclass(frozen=True)
class Job:
    """One scheduled dn command: a service and the timer that starts it."""

    unit: str
    description: str
    argv: tuple[str, ...]  # after the dn executable
    on_calendar: str | None = None  # None: every HEALTH_INTERVAL_S seconds
    timeout: str = "6h"
    writable: tuple[str, ...] = ()
    private_devices: bool = True
    namespaces: bool = False


def _calendar(value: str, field: str) -> str:
    try:
        return check_oncalendar(value)
    except ValueError as e:
        raise InvalidInput(field, str(e)) from None


def jobs(host: HostBaseline, tenants: Sequence[TenantSpec], schedules: ScheduleConfig) -> list[Job]:
    """The scheduled jobs of one host, tenants' backups first."""
    out = [
        Job(
            unit=t.backup_unit,
            description=f"dn backup of tenant {t.slug}",
            argv=("backup", "run", "--tenant", t.slug),
            on_calendar=_calendar(t.backup_schedule, f"tenant {t.slug}: backup_schedule"),
            writable=(host.path(TENANT_VOLUMES),),
        )
        for t in tenants
    ]
    out += [
        Job(
            unit="dn-backup-platform",
            description="dn backup of the platform database",
            argv=("backup", "run", "--platform"),
            on_calendar=_calendar(schedules.backup, "schedules.backup"),
        ),
        Job(
            unit="dn-health",
            description="dn health check of every tenant",
            argv=("health", "check", "--alert-after", str(host.health_alert_after)),
            timeout="50s",  # finishes before the next run is due
        ),
        Job(
            unit="dn-verify",
            description="dn verify: check the trust page's claims against this host",
            argv=("verify", "--alert"),
            on_calendar=_calendar(schedules.verify, "schedules.verify"),
            timeout="1h",
        ),
        Job(
            unit="dn-drill",
            description="dn disaster-recovery restore drill",
            argv=("dr", "drill"),
            on_calendar=_calendar(schedules.drill, "schedules.drill"),
            timeout="4h",  # the promised RTO
            writable=(host.path(TENANT_VOLUMES),),
            private_devices=False,
            namespaces=True,
        ),
        Job(
            unit="dn-retention",
            description="dn retention enforcement",
            argv=("retention", "enforce"),
            on_calendar=_calendar(schedules.retention, "schedules.retention"),
            timeout="1h",
        ),
    ]
    return out


def render_job(job: Job, host: HostBaseline) -> dict[str, str]:
    """The service and timer files of one job, keyed by on-host path."""
    env = environment("systemd", sd_line)
    common = {"unit": job.unit, "host": host, "description": job.description}
    service = env.get_template("job.service.j2").render(
        argv=(host.dn_bin, *job.argv),
        timeout=job.timeout,
        writable=[host.data_dir, *job.writable],
        private_devices=job.private_devices,
        namespaces=job.namespaces,
        **common,
    )
    timer = env.get_template("job.timer.j2").render(on_calendar=job.on_calendar, interval=HEALTH_INTERVAL_S, **common)
    base = host.path(f"{UNIT_DIR}/{job.unit}")
    return {base + ".service": service, base + ".timer": timer}


def render_units(host: HostBaseline, tenants: Sequence[TenantSpec], schedules: ScheduleConfig) -> dict[str, str]:
    """Every dn unit of one host, keyed by on-host path."""
    files: dict[str, str] = {}
    for job in jobs(host, tenants, schedules):
        files.update(render_job(job, host))
    return files


def timer_names(host: HostBaseline, tenants: Sequence[TenantSpec], schedules: ScheduleConfig) -> list[str]:
    """The timer unit names to enable (``systemctl enable --now``)."""
    return [f"{j.unit}.timer" for j in jobs(host, tenants, schedules)]
