"""Record the ``docker inspect`` and Engine API answers that tests/unit/test_docker_argv.py parses.

Run as root with the sandbox up (``dn sandbox up``), from the checkout:

    .venv/bin/python -m tests.data.docker.record

Every object is created on the sandbox's dockerd (in netns dn-eu1, over dn's SSH layer), inspected,
written here as JSON and removed again. The secret env value is a fixed fake (``FAKE_SECRET``),
never a real CONTAINER_CONFIG.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from dn import sandbox, ssh
from dn.host import docker as hd
from tests.fixtures.sandbox import TEST_DATA, sandbox_settings

HERE = Path(__file__).resolve().parent
FAKE_SECRET = "ZmFrZS1jb250YWluZXItY29uZmlnLWZvci10ZXN0cw=="
IMAGE = sandbox.IMAGE
NET = "dn-t-dkr-rec"
SUBNET, GATEWAY = "10.210.239.0/28", "10.210.239.1"


def _spec(name: str, ip: str, **over) -> hd.ContainerSpec:
    data = {"name": name, "tenant": "dkr-rec", "role": "tagging", "image": IMAGE, "network": NET, "ipv4": ip,
            "memory_mb": 96, "cpus": 0.5, "env": {"PORT": "8080", "PREVIEW_SERVER_URL": "https://t.example/_dn/preview"},
            "health": {"test": hd.default_health_test(), "interval_s": 1, "timeout_s": 2, "retries": 2,
                       "start_period_s": 0},
            "wait_s": 30}
    data.update(over)
    return hd.container_spec(data)


def _save(name: str, data: bytes) -> None:
    (HERE / name).write_bytes(data)
    print(f"wrote {name}")


def _inspect(s: ssh.Session, argv: list[str]) -> bytes:
    return json.dumps(json.loads(s.run(argv).stdout), indent=2, sort_keys=True).encode() + b"\n"


def _cleanup(s: ssh.Session) -> None:
    for ref in ("dn-dkr-rec-tagging", "dn-dkr-rec-nocheck", "dn-dkr-rec-sick", "dn-dkr-rec-cli", "dn-dkr-rec-exit"):
        hd.remove_container(s, ref)
    for net in (NET, NET + "-icc"):
        hd.remove_network(s, net)


def main() -> None:
    sandbox.up(TEST_DATA, embedded=True)
    settings = sandbox_settings(TEST_DATA)
    with ssh.connect(settings.host()) as s:
        _cleanup(s)
        try:
            net = hd.network_spec({"name": NET, "tenant": "dkr-rec", "bridge": "dntrecord0001", "subnet": SUBNET,
                                   "gateway": GATEWAY})
            hd.ensure_network(s, net)
            _save("network-tenant.json", _inspect(s, hd.network_inspect_argv(NET)))
            # what a hand-made network looks like: ICC on (no option), docker's own bridge name
            s.run(["docker", "network", "create", "--subnet", "10.210.239.16/28", "--label", "dn.tenant=dkr-rec",
                   "--opt", "com.docker.network.bridge.enable_icc=true", NET + "-icc"])
            _save("network-icc-enabled.json", _inspect(s, hd.network_inspect_argv(NET + "-icc")))

            hd.deploy_container(s, _spec("dn-dkr-rec-tagging", "10.210.239.2"), {"CONTAINER_CONFIG": FAKE_SECRET})
            _save("container-tagging.json", _inspect(s, hd.container_inspect_argv("dn-dkr-rec-tagging")))

            nocheck = _spec("dn-dkr-rec-nocheck", "10.210.239.3", role="preview", health={"test": ["NONE"]},
                            env={"PORT": "8080", "RUN_AS_PREVIEW_SERVER": "true"})
            hd.deploy_container(s, nocheck, {"CONTAINER_CONFIG": FAKE_SECRET})
            _save("container-no-healthcheck.json", _inspect(s, hd.container_inspect_argv("dn-dkr-rec-nocheck")))

            sick = _spec("dn-dkr-rec-sick", "10.210.239.4", health={
                "test": ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:9/healthz"],
                "interval_s": 1, "timeout_s": 1, "retries": 2, "start_period_s": 0})
            cid, _ = hd.api_create(s, sick, {"CONTAINER_CONFIG": FAKE_SECRET}, sick.name)
            s.run(hd.container_start_argv(cid))
            for _ in range(60):
                obj = hd.inspect_container(s, cid)
                if ((obj or {}).get("State") or {}).get("Health", {}).get("Status") == "unhealthy":
                    break
                time.sleep(0.5)
            _save("container-unhealthy.json", _inspect(s, hd.container_inspect_argv(cid)))

            # made by hand with the CLI: a published port, an added capability, CLI option spellings
            s.run(["docker", "create", "--name", "dn-dkr-rec-cli", "--network", NET, "-p", "127.0.0.1:18080:8080",
                   "--cap-add", "NET_ADMIN", "--security-opt", "no-new-privileges", "--env", "CONTAINER_CONFIG=hand-made",
                   "--label", "dn.tenant=dkr-rec", IMAGE])
            _save("container-cli-published.json", _inspect(s, hd.container_inspect_argv("dn-dkr-rec-cli")))

            s.run(["docker", "create", "--name", "dn-dkr-rec-exit", "--network", "none", "--entrypoint", "/bin/sh",
                   IMAGE, "-c", "exit 3"])
            s.run(hd.container_start_argv("dn-dkr-rec-exit"))
            time.sleep(1)
            _save("container-exited.json", _inspect(s, hd.container_inspect_argv("dn-dkr-rec-exit")))

            # raw Engine API answers through `docker system dial-stdio`
            r = s.run(list(hd.DIAL_ARGV), stdin=hd.http_request("GET", "/containers/dn-dkr-rec-absent/json"))
            _save("http-404.txt", r.stdout)
            r = s.run(list(hd.DIAL_ARGV), stdin=hd.create_request(_spec("x", "10.210.239.9", image="dn.local/absent:1"),
                                                                   {"CONTAINER_CONFIG": FAKE_SECRET}, "dn-dkr-rec-absent"))
            _save("http-create-no-image.txt", r.stdout)
            spec = _spec("dn-dkr-rec-api", "10.210.239.10")
            r = s.run(list(hd.DIAL_ARGV), stdin=hd.create_request(spec, {"CONTAINER_CONFIG": FAKE_SECRET}, spec.name))
            _save("http-create-201.txt", r.stdout)
            hd.remove_container(s, spec.name)
        finally:
            _cleanup(s)


if __name__ == "__main__":
    main()
