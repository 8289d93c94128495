"""`dn health check` against a real tenant on the sandbox host: healthy through nginx and Docker,
then a stopped container fails the check, alerts once after the configured number of failures,
and once more on recovery. Also `dn sandbox cert`, which installs the tenant's certificate."""
from __future__ import annotations

import json
import sys
import time

import pytest

from tests.fixtures.sandbox import host_lock
from tests.stacks import e2e

pytestmark = [pytest.mark.engine, pytest.mark.sandbox, pytest.mark.postgres,
              pytest.mark.skipif(e2e.engine_missing() is not None, reason=e2e.engine_missing() or "")]

SLUG = "thealth"
DOMAIN = "gtm.thealth.example"
CONFIG = "dGhlYWx0aC1zdGFuZC1pbi1jb250YWluZXItY29uZmln"  # a stand-in value, not a real one


@pytest.fixture
def tenant(sandbox, dn_settings_data, tmp_path):
    env = e2e.make_env(sandbox, dn_settings_data, tmp_path)
    alerts = tmp_path / "alerts.jsonl"
    # the alert hook: append each alert (JSON on stdin) as one line
    env.write_config(env.config, alert={"command": [sys.executable, "-c",
                     f"import sys; open({str(alerts)!r}, 'a').write(sys.stdin.read() + '\\n')"]})
    e2e.ensure_host_dn()
    with host_lock():
        r = env.dn("sandbox", "cert", DOMAIN)
        assert r.returncode == 0, r.stderr
        code, _, err = env.dn_json("host", "up")
        assert code == 0, err
        r = env.dn("tenant", "create", SLUG, "--domain", DOMAIN, "--container-config-stdin", input=CONFIG)
        assert r.returncode == 0, r.stderr
        try:
            yield env, alerts
        finally:
            env.dn("tenant", "destroy", SLUG, "--yes")
            sandbox.ns_exec(["rm", "-f", f"{sandbox.host.prefix}/etc/dn/tls/{DOMAIN}.crt",
                             f"{sandbox.host.prefix}/etc/dn/tls/{DOMAIN}.key"], check=False)


def mine(results: list[dict]) -> dict:
    (r,) = [x for x in results if x["slug"] == SLUG]
    return r


def wait_healthy(sandbox, name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = sandbox.docker(["inspect", "--format", "{{.State.Health.Status}}", name])
        if r.stdout.decode().strip() == "healthy":
            return
        time.sleep(1)
    raise AssertionError(f"{name} did not become healthy in {timeout}s")


def test_health_check_sees_a_stopped_container_and_alerts_once(tenant, sandbox):
    env, alerts = tenant
    code, data, err = env.dn_json("health", "check", "--tenant", SLUG, "--alert-after", "2")
    assert code == 0, err
    r = mine(data)
    assert r["ok"] and r["public"] == "200"
    assert r["containers"] == {f"dn-{SLUG}-tagging": "healthy", f"dn-{SLUG}-preview": "healthy"}

    sandbox.docker(["stop", f"dn-{SLUG}-tagging"])
    try:
        code, data, _ = env.dn_json("health", "check", "--tenant", SLUG, "--alert-after", "2")
        r = mine(data)
        assert code == 1 and not r["ok"] and r["containers"][f"dn-{SLUG}-tagging"] == "stopped"
        assert r["public"] != "200" and r["failures_in_a_row"] == 1
        assert not alerts.exists()  # one failure is not yet a sustained one

        code, data, _ = env.dn_json("health", "check", "--tenant", SLUG, "--alert-after", "2")
        assert code == 1 and mine(data)["failures_in_a_row"] == 2
        sent = [json.loads(line) for line in alerts.read_text().splitlines()]
        assert [(a["kind"], a["slug"]) for a in sent] == [("health.down", SLUG)]
        code, _, _ = env.dn_json("health", "check", "--tenant", SLUG, "--alert-after", "2")
        assert len(alerts.read_text().splitlines()) == 1  # no repeat while it stays down
    finally:
        sandbox.docker(["start", f"dn-{SLUG}-tagging"])
    wait_healthy(sandbox, f"dn-{SLUG}-tagging")
    code, data, _ = env.dn_json("health", "check", "--tenant", SLUG, "--alert-after", "2")
    assert code == 0 and mine(data)["ok"]
    sent = [json.loads(line) for line in alerts.read_text().splitlines()]
    assert [a["kind"] for a in sent] == ["health.down", "health.recovered"]
