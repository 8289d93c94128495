"""dn against the VM sandbox host with the production layout (host prefix ``/``, real systemd):
``dn doctor`` sees the host's services and device-mapper; ``dn host up`` applies the baseline and
systemd really enables and schedules dn's timers, and fires the health check (its runs are in the
journal; they fail for now: the host's dn has no database access yet, issue 12); ``dn host
destroy`` disables and removes them."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.stacks import e2e

pytestmark = [pytest.mark.vm, pytest.mark.engine, pytest.mark.postgres,
              pytest.mark.skipif(e2e.engine_missing() is not None, reason=e2e.engine_missing() or "")]

HOST_TIMERS = ("dn-backup-platform.timer", "dn-health.timer", "dn-verify.timer", "dn-drill.timer",
               "dn-retention.timer")


@pytest.fixture
def env(vm_host, dn_settings_data, tmp_path):
    from dn import vm
    from dn.config import Settings
    from dn.context import Context

    data_dir = Path(dn_settings_data["data_dir"])
    pf = data_dir / "passphrase"
    pf.write_text(e2e.PASSPHRASE + "\n")
    pf.chmod(0o600)
    data = {
        "data_dir": str(data_dir),
        "default_host": vm.HOST_NAME,
        "hosts": {vm.HOST_NAME: vm.host_entry(vm.ClientFiles.of(vm_host.data_dir))},
        "database": dn_settings_data["database"],
        "secrets": {"passphrase_file": str(pf)},
        "images": {"sgtm": "dn.local/sgtm-standin:1"},
    }
    settings = Settings.model_validate({**data, "source": "tests/vm"})
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DN_") and k not in ("CI", "GITHUB_ACTIONS")}
    config = tmp_path / "dn.toml"
    e = e2e.Env(settings, data, config, environ, None)
    e.write_config(config)
    environ.update(DN_CONFIG=str(config), DN_HOME=str(data_dir))
    e.ctx = Context(environ=dict(environ), _settings=settings)
    return e


def test_doctor_sees_a_production_host(env):
    from dn import vm

    code, checks, err = env.dn_json("doctor")
    assert checks, err
    by_name = {c["name"]: c for c in checks}
    host = vm.HOST_NAME
    for name in (f"ssh {host}", f"{host}: nginx", f"{host}: iptables", f"{host}: dockerd", f"{host}: cryptsetup",
                 f"{host}: device-mapper", "postgresql", "secrets passphrase"):
        assert by_name[name]["ok"], by_name[name]
    # no backup region in this configuration: the one failure, named
    assert [c["name"] for c in checks if c["required"] and not c["ok"]] == ["backup region"], checks
    assert code == 1


def timers_listed(vm_host) -> dict[str, str]:
    out = vm_host.run(["systemctl", "list-timers", "--all", "--no-legend", "--plain", "--output=json"],
                      check=False).text
    try:
        rows = json.loads(out)
        return {r["unit"]: r.get("next") for r in rows}
    except ValueError:  # systemd without --output=json for list-timers: parse the plain table
        listed = vm_host.run(["systemctl", "list-timers", "--all", "--no-legend", "--plain"]).text
        return {w: "" for line in listed.splitlines() for w in line.split() if w.endswith(".timer")}


def test_host_up_enables_dn_timers_under_systemd(env, vm_host):
    since = vm_host.run(["date", "+%Y-%m-%d %H:%M:%S"]).text.strip()
    code, out, err = env.dn_json("host", "up", timeout=1200)
    assert code == 0, err[-3000:]
    assert out["changes"].get("create"), out
    listed = timers_listed(vm_host)
    for t in HOST_TIMERS:
        assert t in listed, f"{t} not in systemctl list-timers: {sorted(listed)}"
        assert vm_host.run(["systemctl", "is-enabled", t], check=False).text.strip() == "enabled", t
        assert vm_host.run(["systemctl", "is-active", t], check=False).text.strip() == "active", t
    # the units are where systemd reads them (host prefix /), and the firewall is in the kernel
    assert vm_host.run(["test", "-f", "/etc/systemd/system/dn-health.service"], check=False).rc == 0
    assert "DN-" in vm_host.run(["iptables-save", "-t", "filter"]).text
    assert "-P INPUT DROP" in vm_host.run(["iptables", "-S", "INPUT"]).text
    # nginx runs under systemd on dn's main configuration
    assert vm_host.run(["systemctl", "is-active", "nginx"], check=False).text.strip() == "active"
    assert "Managed by dn" in vm_host.run(["head", "-1", "/etc/nginx/nginx.conf"]).text

    code, out, err = env.dn_json("host", "up", timeout=1200)
    assert code == 0, err[-3000:]
    assert not {k: v for k, v in out["changes"].items() if k != "same"}, out  # converged

    # systemd fires the 60-second health check by itself: the journal shows its runs
    deadline = time.monotonic() + 240
    runs = ""
    while time.monotonic() < deadline:
        runs = vm_host.run(["journalctl", "--no-pager", "-o", "cat", "-u", "dn-health.service",
                            "--since", since], check=False).text
        if "Starting dn-health.service" in runs or "Started dn-health.service" in runs:
            break
        time.sleep(10)
    assert "dn-health.service" in runs, f"no run of dn-health.service in the journal since {since}: {runs[-500:]}"

    code, out, err = env.dn_json("host", "destroy", "--yes", timeout=1200)
    assert code == 0, err[-3000:]
    listed = timers_listed(vm_host)
    assert not [t for t in HOST_TIMERS if t in listed], listed
    assert vm_host.run(["test", "-e", "/etc/systemd/system/dn-health.service"], check=False).rc != 0
