"""dn's systemd timers installed over SSH on the sandbox EU host and verified by systemd-analyze.

The sandbox has no systemd and keeps dn's files under a prefix, so the timers are installed and
verified but not enabled; the plan says so. The units' ExecStart is this checkout's dn entry point
(systemd-analyze verify checks that the command exists).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dn import ssh
from dn.config import ScheduleConfig
from dn.host import timers as ht
from dn.models import HostBaseline, parse_tenant
from dn.render.systemd import UNIT_DIR
from dn.sandbox import IMAGE

pytestmark = pytest.mark.sandbox
DN_BIN = str(Path(sys.executable).parent / "dn")


def host(sandbox, **over) -> HostBaseline:
    return HostBaseline.from_settings(sandbox.settings, **{"dn_bin": DN_BIN, **over})


def tenant(sandbox, slug: str = "tma", **over):
    data = {"slug": slug, "domains": [f"{slug}.example"], "image": IMAGE, "subnet": "10.210.40.0/28", **over}
    return parse_tenant(data, plans=sandbox.settings.plans, host_view=True)


@pytest.fixture
def clean(sandbox):
    """No dn unit of these names on the host during the test; whatever was there before (the host
    baseline's own timers, applied by an earlier test) is put back exactly afterwards."""
    h = host(sandbox)
    sets = [ht.tenant_timers(h, tenant(sandbox)), ht.host_timers(h, ScheduleConfig())]
    before = {p: Path(p).read_bytes() for ts in sets for p in ts.files if Path(p).exists()}
    with ssh.connect(sandbox.host) as s:
        for ts in sets:
            ht.remove(s, h, ts)
    yield h, sets
    with ssh.connect(sandbox.host) as s:
        for ts in sets:
            ht.remove(s, h, ts)
        for p, data in before.items():
            s.install_file(p, data)


def test_rendered_units_are_installed_verified_and_not_enabled_without_systemd(sandbox, clean):
    h, (tenant_set, host_set) = clean
    assert Path(DN_BIN).exists()
    with ssh.connect(sandbox.host) as s:
        for ts in (tenant_set, host_set):
            done = ht.converge(s, h, ts)
            assert [c.action for c in done.plan.changes] == ["create"] * len(ts.files)
            assert any("not enabled" in n and "installed and verified" in n for n in done.notes)
            assert ht.converge(s, h, ts).plan.empty  # twice: nothing to do
    assert tenant_set.timers == ("dn-backup-tma.timer",)
    assert set(host_set.timers) == {"dn-backup-platform.timer", "dn-health.timer", "dn-verify.timer",
                                    "dn-drill.timer", "dn-retention.timer"}
    paths = sorted(p for ts in (tenant_set, host_set) for p in ts.files)
    for p in paths:
        assert Path(p).read_bytes() == {**tenant_set.files, **host_set.files}[p]
    # verify the installed files once more, independently of dn's own check
    r = sandbox.ns_exec(ht.verify_argv(paths), check=False)
    assert r.returncode == 0 and not [line for line in r.stderr.decode().splitlines() if "dn-" in line], r.stderr


def test_a_unit_systemd_would_refuse_never_stays_in_place(sandbox, clean):
    h, (tenant_set, _) = clean
    with ssh.connect(sandbox.host) as s:
        ht.converge(s, h, tenant_set)
        before = {p: Path(p).read_bytes() for p in tenant_set.files}
        broken_host = host(sandbox, dn_bin="/nonexistent/dn")  # verify: "Command ... is not executable"
        broken = ht.tenant_timers(broken_host, tenant(sandbox))
        with pytest.raises(ssh.CheckFailed) as ei:
            ht.converge(s, broken_host, broken)
        assert "systemd-analyze verify refused" in str(ei.value) and "previous versions restored" in str(ei.value)
        assert {p: Path(p).read_bytes() for p in tenant_set.files} == before
        # a new schedule goes through and verifies
        later = ht.tenant_timers(h, tenant(sandbox, backup_schedule="*-*-* 04:15:00"))
        assert [c.action for c in ht.converge(s, h, later).plan.changes] == ["update"]
        assert b"OnCalendar=*-*-* 04:15:00" in Path(h.path(f"{UNIT_DIR}/dn-backup-tma.timer")).read_bytes()


def test_removal_deletes_the_units(sandbox, clean):
    h, (tenant_set, _) = clean
    with ssh.connect(sandbox.host) as s:
        ht.converge(s, h, tenant_set)
        removed = ht.remove(s, h, tenant_set)
        assert [c.action for c in removed.plan.changes] == ["delete", "delete"]
        assert ht.remove(s, h, tenant_set).plan.empty
    assert not [p for p in tenant_set.files if Path(p).exists()]
