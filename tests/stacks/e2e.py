"""Helpers for the end-to-end stack tests: dn's settings for the sandbox EU host with the test
database, the `dn` command as a subprocess, and the sandbox host's shared-use rules.

The sandbox host is shared by every test session on this machine. These tests hold
``/run/lock/dn-sandbox.host.lock`` (as the verify tests do) while they change the host, and put
dn's host baseline back when they remove it, for whoever uses the sandbox next.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
HOST_DN = Path("/usr/local/bin/dn")  # HostBaseline.dn_bin: where the timers find dn on a host
PASSPHRASE = "stacks e2e: nine tidy otters row east"


def engine_missing() -> str | None:
    """Why the real engine cannot run here, or None."""
    from dn import tooling

    prov = tooling.status()
    cli = next(t for t in prov.tools if t.name == "pulumi")
    launcher = next(t for t in prov.tools if t.name == tooling.DYNAMIC_LAUNCHER)
    if not (cli.present and launcher.present):
        return f"the Pulumi CLI v{tooling.PULUMI_VERSION} is not provisioned in {prov.root}: run `dn setup`"
    return None




def ensure_host_dn() -> None:
    """The sandbox host is this machine: give it dn where a real host has it, so the timers'
    ExecStart passes ``systemd-analyze verify``."""
    if HOST_DN.exists():
        if not os.access(HOST_DN, os.X_OK):
            pytest.skip(f"{HOST_DN} exists but is not executable: the timers cannot be verified")
        return
    target = Path(sys.executable).parent / "dn"
    try:
        HOST_DN.symlink_to(target)
    except FileExistsError:
        pass


def with_changes(data: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``data`` with each ``"section.key": value`` of ``changes`` set in place (returns it)."""
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split(".")
        for k in parents:
            node = node[k]
        node[last] = value
    return data


@dataclass
class Env:
    settings: Any
    data: dict
    config: Path
    env: dict[str, str]
    ctx: Any

    def dn(self, *argv: str, input: str | None = None, timeout: float = 600, config: Path | None = None
           ) -> subprocess.CompletedProcess:
        env = dict(self.env)
        if config is not None:
            env["DN_CONFIG"] = str(config)
        return subprocess.run([sys.executable, "-c", "from cli.main import run; run()", *argv], env=env, cwd=REPO,
                              input=input, capture_output=True, text=True, timeout=timeout)

    def dn_json(self, *argv: str, **kw) -> tuple[int, Any, str]:
        r = self.dn(*argv, "--json", **kw)
        try:
            data = json.loads(r.stdout) if r.stdout.strip() else None
        except ValueError:
            data = None
        return r.returncode, data, r.stderr

    def write_config(self, path: Path, **changes: Any) -> Path:
        from tests.fixtures.postgres import to_toml

        data = with_changes(json.loads(json.dumps(self.data)), changes)
        data.pop("source", None)
        path.write_text(to_toml(data) + "\n")
        return path


def make_env(sandbox, dn_settings_data: dict, tmp_path: Path, **extra: Any) -> Env:
    """dn's settings for the sandbox EU host, the test database and a data dir of the test's own
    (its own state backend, stack work dirs and passphrase)."""
    from dn.config import Settings
    from dn.context import Context

    data = sandbox.settings.model_dump(mode="json", exclude_none=True)
    data.pop("source", None)
    data_dir = Path(dn_settings_data["data_dir"])
    pf = data_dir / "passphrase"
    pf.write_text(PASSPHRASE + "\n")
    pf.chmod(0o600)
    data.update(data_dir=str(data_dir), database=dn_settings_data["database"],
                secrets={"passphrase_file": str(pf)}, state={})
    data.update(extra)
    settings = Settings.model_validate({**data, "source": "tests/stacks/e2e.py"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("DN_") and k not in ("CI", "GITHUB_ACTIONS")}
    config = tmp_path / "dn.toml"
    e = Env(settings, data, config, env, None)
    e.write_config(config)
    env.update(DN_CONFIG=str(config), DN_HOME=str(data_dir))
    e.ctx = Context(environ=dict(env), _settings=settings)
    return e


def foreign_tenants_on_host(sandbox, host, mine: set[str] = frozenset()) -> list[str]:
    """Tenant chains and vhosts of other sessions on the shared sandbox host (they make dn
    refuse to remove the baseline, rightly)."""
    from dn import ssh
    from dn.host import nginx as hn
    from dn.render.iptables import parse_save

    out = []
    v4 = parse_save(sandbox.ns_exec(["iptables-save", "-t", "filter"]).stdout.decode())["filter"]
    out += [c for c in v4.policies if c.startswith(("DN-T-", "DN-TI-")) and c not in mine]
    with ssh.connect(sandbox.host) as s:
        out += [f"vhost {v}" for v in hn.served_vhosts(s, host) if v not in mine]
    return out
