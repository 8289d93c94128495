"""systemd renderer: unit structure, schedules, hardening, and the real `systemd-analyze verify`."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dn.config import PlanConfig, ScheduleConfig
from dn.errors import InvalidInput
from dn.models import TenantSpec, parse_host, parse_tenant
from dn.render import UnsafeValue
from dn.render.systemd import render_units, timer_names

DN_BIN = str(Path(sys.executable).parent / "dn")  # the installed dn entry point of this venv


def tenant(slug="acme", **over) -> TenantSpec:
    data = {
        "slug": slug,
        "domains": [f"{slug}.example"],
        "image": "dn.local/sgtm-standin:1",
        "container_config": "aWQ9R1RNLVhYWFgmZW52PTE=",
        "subnet": "10.210.0.0/28",
    }
    data.update(over)
    return parse_tenant(data, plans={"standard": PlanConfig()})


def host(tmp: Path | None = None, **over):
    data = {"name": "eu1", "admin_sources": ["192.0.2.10/32"], "dn_bin": DN_BIN, "dn_config": "/etc/dn/config.toml"}
    if tmp is not None:
        (tmp / "data").mkdir(exist_ok=True)
        data.update(prefix=str(tmp), data_dir=str(tmp / "data"))
    data.update(over)
    return parse_host(data)


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    cur = None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            cur = sections.setdefault(line.strip("[]"), [])
        else:
            key, _, value = line.partition("=")
            assert cur is not None and key and _, line
            cur.append((key, value))
    return sections


def get(sections, section, key) -> list[str]:
    return [v for k, v in sections.get(section, []) if k == key]


TENANTS = [
    tenant("alpha", backup_schedule="*-*-* 01:15:00"),
    tenant("bravo", subnet="10.210.0.16/28", backup_schedule="Mon..Fri *-*-* 0/6:00"),
]
SCHED = ScheduleConfig()
D = "/etc/systemd/system/"

EXPECTED = {
    "dn-backup-alpha": (["backup", "run", "--tenant", "alpha"], "*-*-* 01:15:00"),
    "dn-backup-bravo": (["backup", "run", "--tenant", "bravo"], "Mon..Fri *-*-* 0/6:00"),
    "dn-backup-platform": (["backup", "run", "--platform"], SCHED.backup),
    "dn-health": (["health", "check", "--alert-after", "3"], None),
    "dn-verify": (["verify", "--alert"], SCHED.verify),
    "dn-drill": (["dr", "drill"], SCHED.drill),
    "dn-retention": (["retention", "enforce"], SCHED.retention),
}


def test_unit_set():
    files = render_units(host(), TENANTS, SCHED)
    assert sorted(files) == sorted(D + u + ext for u in EXPECTED for ext in (".service", ".timer"))
    assert timer_names(host(), TENANTS, SCHED) == [u + ".timer" for u in EXPECTED]


@pytest.mark.parametrize("unit", sorted(EXPECTED))
def test_service_runs_dn_hardened(unit):
    argv, _ = EXPECTED[unit]
    svc = parse_unit(render_units(host(), TENANTS, SCHED)[D + unit + ".service"])
    assert get(svc, "Service", "Type") == ["oneshot"]
    assert get(svc, "Service", "ExecStart") == [" ".join([DN_BIN, *argv])]
    assert get(svc, "Service", "Environment") == ["DN_CONFIG=/etc/dn/config.toml"]
    for key, value in [
        ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("PrivateTmp", "yes"), ("ProtectHome", "read-only"),
        ("ProtectKernelTunables", "yes"), ("ProtectKernelModules", "yes"), ("ProtectControlGroups", "yes"),
        ("RestrictSUIDSGID", "yes"), ("LockPersonality", "yes"), ("UMask", "0077"), ("SystemCallArchitectures", "native"),
    ]:
        assert get(svc, "Service", key) == [value], key
    writable = get(svc, "Service", "ReadWritePaths")[0].split()
    assert writable[0] == "/var/lib/dn"
    if unit in ("dn-drill",) or unit.startswith("dn-backup-") and unit != "dn-backup-platform":
        assert writable[1:] == ["/srv/dn/tenants"]
    else:
        assert writable[1:] == []
    # only the drill keeps devices and namespaces (LUKS volumes, scratch containers)
    assert get(svc, "Service", "PrivateDevices") == ([] if unit == "dn-drill" else ["yes"])
    assert get(svc, "Service", "RestrictNamespaces") == (["no"] if unit == "dn-drill" else ["yes"])


@pytest.mark.parametrize("unit", sorted(EXPECTED))
def test_timer_schedule(unit):
    _, calendar = EXPECTED[unit]
    tmr = parse_unit(render_units(host(), TENANTS, SCHED)[D + unit + ".timer"])
    assert get(tmr, "Timer", "Unit") == [unit + ".service"]
    assert get(tmr, "Install", "WantedBy") == ["timers.target"]
    if calendar is None:  # the health check: every 60 s, as the trust page says
        assert get(tmr, "Timer", "OnUnitActiveSec") == ["60s"] and get(tmr, "Timer", "OnBootSec") == ["60s"]
        assert get(tmr, "Timer", "OnCalendar") == []
    else:
        assert get(tmr, "Timer", "OnCalendar") == [calendar]
        assert get(tmr, "Timer", "Persistent") == ["true"]


def test_alert_threshold_and_prefix():
    files = render_units(host(prefix="/srv/dn-sandbox/eu1", health_alert_after=5), [], SCHED)
    svc = parse_unit(files["/srv/dn-sandbox/eu1" + D + "dn-health.service"])
    assert get(svc, "Service", "ExecStart") == [f"{DN_BIN} health check --alert-after 5"]


@pytest.mark.parametrize(
    "field, value, rule",
    [
        ("backup", "*-*-* 25:00", "hour: 25 is outside 0..23"),  # passes the settings pattern, not ours
        ("drill", "2024-*-01 04:00", "the year must be '*'"),
        ("verify", "*-02-31 05:00", "never run"),
    ],
)
def test_settings_schedules_are_checked_strictly(field, value, rule):
    sched = ScheduleConfig(**{field: value})
    with pytest.raises(InvalidInput) as ei:
        render_units(host(), [], sched)
    assert ei.value.field == f"schedules.{field}" and rule in ei.value.rule


def test_forged_values_are_refused():
    good = tenant()
    forged_sched = TenantSpec.model_construct(**{**dict(good), "backup_schedule": "daily\nExecStartPre=/bin/sh"})
    with pytest.raises(InvalidInput) as ei:
        render_units(host(), [forged_sched], SCHED)
    assert ei.value.field == "tenant acme: backup_schedule"
    forged_slug = TenantSpec.model_construct(**{**dict(good), "slug": "acme --platform; rm"})
    with pytest.raises(UnsafeValue):
        render_units(host(), [forged_slug], SCHED)
    forged_pct = TenantSpec.model_construct(**{**dict(good), "slug": "acme%n"})
    with pytest.raises(UnsafeValue):
        render_units(host(), [forged_pct], SCHED)


# --------------------------------------------------------------------------- real systemd-analyze

needs_analyze = pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")


def _write(files: dict[str, str]) -> list[str]:
    for p, text in files.items():
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        Path(p).write_text(text)
    return sorted(files)


def _verify(paths: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", *paths], capture_output=True, text=True, timeout=120)


@needs_analyze
def test_systemd_analyze_verify_accepts_every_unit(tmp_path):
    assert Path(DN_BIN).exists()
    paths = _write(render_units(host(tmp_path), TENANTS, SCHED))
    r = _verify(paths)
    assert r.returncode == 0, r.stderr
    # warnings (unknown keys, bad values) go to stderr with exit code 0: require none for our files
    assert not [line for line in r.stderr.splitlines() if str(tmp_path) in line], r.stderr


@needs_analyze
@pytest.mark.parametrize(
    "unit, old, new, expect",
    [
        ("dn-verify.timer", "OnCalendar=*-*-* 05:00:00", "OnCalendar=*-*-* 25:00:00", "Failed to parse"),
        ("dn-verify.service", "NoNewPrivileges=yes", "NoNewPrivilegez=yes", "Unknown key"),
        ("dn-verify.service", f"ExecStart={DN_BIN}", "ExecStart=/nonexistent/dn", "not executable"),
    ],
)
def test_systemd_analyze_verify_catches_broken_units(tmp_path, unit, old, new, expect):
    """The check above can fail: the same verify run flags a corrupted copy."""
    files = render_units(host(tmp_path), [], SCHED)
    key = str(tmp_path) + D + unit
    assert old in files[key]
    files[key] = files[key].replace(old, new)
    r = _verify(_write(files))
    assert expect in r.stderr, r.stderr
