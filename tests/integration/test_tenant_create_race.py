"""`dn tenant create` (the real engine, dn's docker backend) puts the tenant's chains in place
before its network and before any of its containers exists, and nothing raced from a container
as it starts gets through.

A watcher follows the sandbox daemon's events while the command runs. At the moment the tenant's
network is created, and at the moment each of its containers starts, it reads the host's
rules: the tenant's chains and hooks must already be there (and so must the baseline's default
drop). As soon as the tagging server
starts, it tries to reach a listener in this (root) namespace from inside it, several times:
nothing may answer. Traffic only to the sandbox's own addresses.
"""
from __future__ import annotations

import subprocess
import threading
import time

import pytest

from dn.models import HostBaseline, short_hash
from dn.render.iptables import TENANTS_DEFAULT_DROP, TENANTS_FWD, TENANTS_IN, parse_save
from dn.sandbox import DAEMON_ENV, DOCKER_HOST
from dn.sandbox import issue_certificate as sandbox_cert
from tests.fixtures.sandbox import host_lock
from tests.integration.test_tenant_isolation_race import ROOT_NS, serve_here
from tests.stacks import e2e

pytestmark = [pytest.mark.engine, pytest.mark.sandbox, pytest.mark.postgres,
              pytest.mark.skipif(e2e.engine_missing() is not None, reason=e2e.engine_missing() or "")]

CONFIG = "c2d0bS1jb250YWluZXItY29uZmlnLXNlY3JldC12YWx1ZQ=="
SLUG = "race-acme"
DOMAIN = "gtm.race-acme.example"
PORT = 9876  # a listener on ROOT_NS (this namespace): forwarded traffic, for the host


@pytest.fixture
def env(sandbox, dn_settings_data, tmp_path):
    env = e2e.make_env(sandbox, dn_settings_data, tmp_path)
    env.write_config(env.config)
    return env


@pytest.fixture
def listener():
    stop = threading.Event()
    th = serve_here(stop, PORT)
    yield
    stop.set()
    th.join(timeout=5)


def chains_now(sandbox, bridge: str, forward: str, inp: str) -> dict[str, bool]:
    v4 = parse_save(sandbox.ns_exec(["iptables-save", "-t", "filter"]).stdout.decode())["filter"]
    return {
        "chains": forward in v4.policies and inp in v4.policies,
        "hooks": v4.count(TENANTS_FWD, ("-i", bridge, "-g", forward)) == 1
        and v4.count(TENANTS_IN, ("-i", bridge, "-j", inp)) == 1,
        "default drop": bool(v4.chain(TENANTS_FWD)) and v4.chain(TENANTS_FWD)[-1] == TENANTS_DEFAULT_DROP,
    }


def test_dn_tenant_create_has_the_chains_before_the_network_and_the_containers(env, sandbox, listener):
    e2e.ensure_host_dn()
    h = short_hash(SLUG, 12)
    bridge, forward, inp = f"dnt{h}", f"DN-T-{h.upper()}", f"DN-TI-{h.upper()}"
    network, tagging = f"dn-t-{SLUG}", f"dn-{SLUG}-tagging"
    seen: list[tuple[str, str, dict[str, bool]]] = []
    raced: list[subprocess.CompletedProcess] = []

    def race(container: str) -> None:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            raced.append(sandbox.docker(["exec", container, "nc", "-w", "1", ROOT_NS, str(PORT)], check=False,
                                        input=b"x\n"))

    events = subprocess.Popen(
        ["docker", "events", "--format", "{{.Type}} {{.Action}} {{.Actor.Attributes.name}}",
         "--filter", "event=create", "--filter", "event=start"],
        stdout=subprocess.PIPE, text=True, env={**DAEMON_ENV, "DOCKER_HOST": DOCKER_HOST})
    racers: list[threading.Thread] = []

    def watch() -> None:
        for line in events.stdout:
            kind, action, name = (line.split() + ["", "", ""])[:3]
            if name in (network, tagging, f"dn-{SLUG}-preview"):
                seen.append((f"{kind} {action}", name, chains_now(sandbox, bridge, forward, inp)))
                if name == tagging and action == "start":
                    th = threading.Thread(target=race, args=(tagging,), daemon=True)
                    th.start()
                    racers.append(th)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    time.sleep(1)  # the event stream is open
    with host_lock():
        host = HostBaseline.from_settings(env.settings)
        crt, key = sandbox_cert(host.prefix, host.cert_dir, [DOMAIN], days=2)
        try:
            code, _, err = env.dn_json("host", "up")
            assert code == 0, err
            r = env.dn("tenant", "create", SLUG, "--domain", DOMAIN, "--container-config-stdin", input=CONFIG)
            assert r.returncode == 0, r.stderr
            for th in racers:
                th.join(timeout=30)
        finally:
            events.terminate()
            events.wait(timeout=10)
            env.dn("tenant", "destroy", SLUG, "--yes")
            crt.unlink(missing_ok=True)
            key.unlink(missing_ok=True)
    kinds = [(k, n) for k, n, _ in seen]
    # (dn's backend creates a container under a name of its own first, then renames it: its
    # start is the first event under the tenant's name)
    assert ("network create", network) in kinds and ("container start", tagging) in kinds, kinds
    for what, name, state in seen:
        assert all(state.values()), f"at {what} of {name} the firewall was not in place: {state}"
    assert raced and not [r for r in raced if b"here" in r.stdout], raced
