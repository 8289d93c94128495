"""The host baseline program under Pulumi's mocks (preview=False): every resource of the host
stack with the properties that carry a promise, and dn's policies over them."""
from __future__ import annotations

import pulumi
import pytest

from tests.stacks import mocking

pulumi.runtime.set_mocks(mocking.Mocks(mocking.Recording()), project="dn", stack="import", preview=False)

from dn.config import Settings, embedded_default  # noqa: E402
from dn.models import HostBaseline  # noqa: E402
from policies import validators as v  # noqa: E402
from stacks import programs  # noqa: E402
from stacks.host import VOLUME_DIR, host_baseline, host_dirs  # noqa: E402

HOST_UNITS = ["dn-backup-platform", "dn-health", "dn-verify", "dn-drill", "dn-retention"]


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    return Settings.model_validate({**embedded_default(tmp_path_factory.mktemp("dn")), "source": "tests/stacks"})


@pytest.fixture(scope="module")
def recorded(settings):
    host = HostBaseline.from_settings(settings)
    inputs = programs.host_inputs(settings, host)

    def body():
        res = host_baseline(inputs)
        return {"dirs": res["dirs"].dirs}

    rec, outs = mocking.run(body, stack="host--sandbox-eu1")
    return host, inputs, rec, outs


def test_resources_of_the_host_stack(recorded):
    host, _inputs, rec, _ = recorded
    names = rec.names()
    expected = ["sandbox-eu1-dirs", "sandbox-eu1-firewall-baseline", "sandbox-eu1-nginx-base"] + \
        [f"sandbox-eu1-timer-{u}" for u in HOST_UNITS]
    assert sorted(names) == sorted(expected)
    dirs = rec.by_name("sandbox-eu1-dirs")
    assert dirs.type == "pulumi-python:dynamic/dn:HostDirectories"
    for r in rec.resources:
        assert r.type.startswith("pulumi-python:dynamic")
        if r is not dirs:
            assert dirs.urn in r.dependencies, r.name  # directories first, removed last


def test_directories_and_their_modes(recorded):
    host, inputs, rec, outs = recorded
    dirs = rec.by_name("sandbox-eu1-dirs").inputs["dirs"]
    prefix = "/srv/dn-sandbox/eu1"
    assert dirs == host_dirs(host) and outs["dirs"] == dirs
    by_path = {d["path"]: d["mode"] for d in dirs}
    assert by_path[prefix + "/var/lib/dn"] == "0700"  # dn's data on the host
    assert by_path[prefix + VOLUME_DIR] == "0700"  # LUKS images
    assert by_path[prefix + "/etc/dn/tls"] == "0700"  # private keys
    assert by_path[prefix + "/srv/dn/tenants"] == "0755"
    # parents before children, so a create never needs a directory it has not made yet
    paths = [d["path"] for d in dirs]
    assert paths.index(prefix + "/var/lib/dn") < paths.index(prefix + VOLUME_DIR)


def test_firewall_nginx_and_timers_get_the_host(recorded, settings):
    host, inputs, rec, _ = recorded
    data = {k: val for k, val in host.model_dump(mode="json").items() if val is not None}
    for name in ("sandbox-eu1-firewall-baseline", "sandbox-eu1-nginx-base"):
        r = rec.by_name(name)
        assert r.inputs["host"] == data and r.inputs["ssh"] == programs.ssh_target_data(settings.host())
        assert "tenant" not in r.inputs
    assert data["public_ports"] == [80, 443] and data["admin_sources"] == ["10.231.1.1/32"]
    for unit in HOST_UNITS:
        t = rec.by_name(f"sandbox-eu1-timer-{unit}")
        assert t.inputs["unit"] == unit and t.inputs["schedules"] == settings.schedules.model_dump(mode="json")


def test_every_host_policy_passes_and_ran(recorded):
    _host, _inputs, rec, _ = recorded
    resources = [v.Resource(r.type, r.name, r.inputs, r.urn) for r in rec.resources]
    assert v.validate_all(resources) == []
    ran = v.applicable(resources)
    assert ran["dn-baseline-public-ports"] == ["sandbox-eu1-firewall-baseline"]
    assert ran["dn-tls-hsts"] == ["sandbox-eu1-nginx-base"]
    assert ran["dn-backup-schedule"] == ["sandbox-eu1-timer-dn-backup-platform"]


def test_a_weekly_platform_backup_is_a_violation(settings):
    weekly = settings.model_copy(update={"schedules": settings.schedules.model_copy(update={"backup": "Sun *-*-* 03:00:00"})})
    host = HostBaseline.from_settings(weekly)

    def body():
        host_baseline(programs.host_inputs(weekly, host))
        return {}

    rec, _ = mocking.run(body, stack="host--sandbox-eu1")
    resources = [v.Resource(r.type, r.name, r.inputs, r.urn) for r in rec.resources]
    assert [(x.policy, x.resource) for x in v.validate_all(resources)] == [
        ("dn-backup-schedule", "sandbox-eu1-timer-dn-backup-platform")]
