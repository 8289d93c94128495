"""Pulumi dynamic resource for one of dn's systemd timers on an EU host: ``SystemdTimer``, a thin
wrapper over ``dn.host.timers`` (see ``common`` for the conventions).

One resource per job: a tenant's backup (``unit="dn-backup-<slug>"`` with ``tenant``) in the
tenant stack, and each host job (``host_units``) in the host stack. The units are installed and
checked with ``systemd-analyze verify``; they are enabled where systemd runs the host.

Outputs: the inputs plus ``digest`` (of the unit files as applied; a refresh that finds them
edited, or the timer disabled where systemd runs, records another digest, so the next ``up``
re-applies) and ``notes`` (e.g. that the timer
is not enabled on a host without systemd). A new unit name or host prefix replaces the resource.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pulumi
from pulumi.dynamic import ReadResult, Resource

from dn.config import ScheduleConfig
from dn.errors import InvalidInput
from dn.host import timers as ht
from dn.host.plan import digest
from dn.models import HostBaseline
from dn.render import systemd as rs
from stacks.providers import common as c

OUTPUTS = ("digest", "notes")


def host_units(host: HostBaseline, schedules: ScheduleConfig) -> list[str]:
    """The unit names of the host's own jobs (one SystemdTimer each in the host stack)."""
    return [j.unit for j in rs.jobs(host, [], schedules)]


def _schedules(props: Mapping[str, Any]) -> ScheduleConfig:
    from pydantic import ValidationError

    try:
        return ScheduleConfig.model_validate(props.get("schedules") or {})
    except ValidationError as e:
        from dn.models import invalid_from

        raise invalid_from(e, "schedules.") from None


def timer_set(props: Mapping[str, Any]) -> ht.TimerSet:
    """The unit files of the ``unit`` input, rendered for the host (and tenant)."""
    host = c.host(props)
    unit = props.get("unit")
    tenant = c.tenant(props) if props.get("tenant") else None
    jobs = rs.jobs(host, [tenant] if tenant else [], _schedules(props))
    job = next((j for j in jobs if j.unit == unit), None)
    if job is None:
        raise InvalidInput("unit", f"{unit!r} is not one of dn's jobs here: {', '.join(j.unit for j in jobs)}")
    files = {p: t.encode() for p, t in rs.render_job(job, host).items()}
    return ht.TimerSet(job.unit, files, (f"{job.unit}.timer",))


class SystemdTimerProvider(c.DigestProvider):
    """Provider of :class:`SystemdTimer`."""

    outputs = OUTPUTS
    replace_keys = ("unit",)

    def render(self, props: Mapping[str, Any]) -> ht.TimerSet:
        return timer_set(props)

    def wanted(self, props: Mapping[str, Any]) -> str:
        return digest(timer_set(props).files)

    def apply(self, session, props: Mapping[str, Any]) -> dict[str, Any]:
        done = ht.converge(session, c.host(props), timer_set(props))
        return {"notes": done.notes}

    def resource_id(self, props: Mapping[str, Any]) -> str:
        return f"{c.host(props).name}:{props['unit']}"

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        ts = timer_set(props)
        with c.state_session(props) as s:
            state = ht.read(s, c.host(props), ts)
        if all(v is None for v in state.files.values()):
            return ReadResult(id_=None, outs={})
        the_plan = ht.plan(ts, state, where=s.where)
        the_digest = digest(state.files)
        if state.systemd and not all(state.enabled.get(t) for t in ts.timers):
            the_digest = "not-enabled:" + the_digest  # systemd runs here and the timer is off: drift
        return ReadResult(id_=id_, outs=self.outs(props, the_digest, {"notes": list(the_plan.notes)}))

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        with c.state_session(props) as s:
            ht.remove(s, c.host(props), timer_set(props))


class SystemdTimer(Resource):
    """One of dn's scheduled jobs on the host: a oneshot service and its timer."""

    digest: pulumi.Output[str]
    notes: pulumi.Output[list]

    def __init__(self, resource_name: str, *, ssh: pulumi.Input[Mapping[str, Any]],
                 host: pulumi.Input[Mapping[str, Any]], unit: pulumi.Input[str],
                 tenant: pulumi.Input[Mapping[str, Any]] | None = None,
                 schedules: pulumi.Input[Mapping[str, Any]] | None = None,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        props = {"ssh": ssh, "host": host, "unit": unit, "tenant": tenant, "schedules": schedules or {},
                 "digest": None, "notes": None}
        super().__init__(SystemdTimerProvider(), resource_name, props, opts)
