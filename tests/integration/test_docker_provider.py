"""The dn-ssh docker backend against the sandbox's real dockerd (netns dn-eu1, reached over SSH).

The providers' methods are called directly, as the engine's provider process would call them
(plus one test through the real Pulumi engine). Two tenants get a network and two containers
each; the assertions read the daemon with the docker CLI from the root namespace, independently of
dn's own inspect parser, and probe the network from inside the containers and from the host.
"""
from __future__ import annotations

import base64
import ipaddress
import json
import os
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dn.config import PlanConfig
from dn.errors import OperationFailed
from dn.host import docker as hd
from dn.models import allocate_subnet, parse_tenant
from stacks.providers.common import SSH_FIELDS
from stacks.providers.docker import DockerContainerProvider, DockerNetworkProvider

pytestmark = pytest.mark.sandbox

REPO = Path(__file__).resolve().parents[2]
SLUGS = ("dkrprov-alpha", "dkrprov-beta")
EXTRA_SLUGS = ("dkrprov-gamma", "dkrprov-delta", "dkrprov-eng")
POOL = "10.210.224.0/20"  # dn's tenant pool, a corner other tests do not use
PLANS = {"standard": PlanConfig(memory_mb=64, cpus=0.25)}
FAST_HEALTH = {"interval_s": 1, "timeout_s": 2, "retries": 2, "start_period_s": 0}
NETWORK, CONTAINER = DockerNetworkProvider(), DockerContainerProvider()


def new_secret() -> str:
    """A fresh CONTAINER_CONFIG-shaped value, so a sighting anywhere can only come from this run."""
    return base64.b64encode(b"dn-test-" + secrets.token_bytes(24)).decode()


def docker_json(sandbox, *argv: str) -> dict:
    return json.loads(sandbox.docker(list(argv)).stdout)[0]


def exists(sandbox, kind: str, name: str) -> bool:
    return sandbox.docker([kind, "inspect", name], check=False).returncode == 0


def cleanup(sandbox, slugs) -> None:
    for slug in slugs:
        for role in ("tagging", "preview"):
            for suffix in ("", hd.NEXT, hd.PREV):
                sandbox.docker(["rm", "-f", f"dn-{slug}-{role}{suffix}"], check=False)
        sandbox.docker(["network", "rm", f"dn-t-{slug}"], check=False)


def free_subnets(sandbox, n: int) -> list[str]:
    ids = sandbox.docker(["network", "ls", "-q"]).stdout.split()
    taken = []
    for net in json.loads(sandbox.docker(["network", "inspect", *[i.decode() for i in ids]]).stdout):
        taken += [c["Subnet"] for c in (net.get("IPAM") or {}).get("Config") or [] if "Subnet" in c]
    taken = [t for t in taken if ipaddress.ip_network(t).version == 4]
    out = []
    for _ in range(n):
        out.append(allocate_subnet(POOL, taken + out))
    return out


def tenant(slug: str, subnet: str, secret: str, **over):
    data = {"slug": slug, "domains": [f"tags.{slug}.example"], "image": "dn.local/sgtm-standin:1",
            "container_config": secret, "subnet": subnet}
    data.update(over)
    return parse_tenant(data, plans=PLANS)


def container_inputs(t, role: str, ssh: dict, secret: str, **over) -> dict:
    inputs = hd.tenant_container_inputs(t, role, health=FAST_HEALTH, wait_s=60)
    inputs.update(ssh=ssh, secret_env={"CONTAINER_CONFIG": secret})
    inputs.update(over)
    return inputs


class ArgvSampler:
    """Reads every process's command line on this machine (the sandbox host shares the pid
    namespace) in a loop, looking for a secret; remembers whether it saw dn's docker commands."""

    def __init__(self, secrets_: list[str]) -> None:
        self.needles = [s.encode() for s in secrets_]
        self.hits: list[tuple[int, bytes]] = []
        self.dial_stdio = 0
        self.passes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read()
                except OSError:
                    continue
                if b"dial-stdio" in cmd:
                    self.dial_stdio += 1
                for s in self.needles:
                    if s in cmd:
                        self.hits.append((int(pid), cmd.replace(s, b"<SECRET>")))
            self.passes += 1

    def __enter__(self) -> "ArgvSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class World:
    ssh: dict
    tenants: dict  # slug -> TenantSpec
    secrets: dict  # slug -> CONTAINER_CONFIG
    net_inputs: dict = field(default_factory=dict)  # slug -> inputs
    net_outs: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)  # (slug, role) -> inputs
    outs: dict = field(default_factory=dict)  # (slug, role) -> outputs
    sampler: ArgvSampler | None = None


@pytest.fixture(scope="module")
def ssh_data(sandbox) -> dict:
    return sandbox.host.model_dump(mode="json", include=set(SSH_FIELDS))


@pytest.fixture(scope="module", autouse=True)
def current_host():
    """What dn's engine gives the providers: the host's SSH target as the configuration has it
    (read and delete never connect with the one recorded in their state)."""
    from stacks.programs import ssh_target_data
    from stacks.providers.common import host_env
    from tests.fixtures.sandbox import TEST_DATA, sandbox_settings

    settings = sandbox_settings(TEST_DATA)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in host_env(settings.default_host, ssh_target_data(settings.host())).items():
            mp.setenv(k, v)
        yield


@pytest.fixture(scope="module")
def world(sandbox, ssh_data):
    cleanup(sandbox, SLUGS)
    subnets = free_subnets(sandbox, len(SLUGS))
    w = World(ssh_data, {}, {})
    for slug, subnet in zip(SLUGS, subnets):
        w.secrets[slug] = new_secret()
        w.tenants[slug] = tenant(slug, subnet, w.secrets[slug])
    try:
        with ArgvSampler(list(w.secrets.values())) as sampler:
            for slug, t in w.tenants.items():
                w.net_inputs[slug] = {**hd.tenant_network_inputs(t), "ssh": ssh_data}
                r = NETWORK.create(w.net_inputs[slug])
                assert r.id == t.network
                w.net_outs[slug] = r.outs
                for role in ("tagging", "preview"):
                    inputs = container_inputs(t, role, ssh_data, w.secrets[slug])
                    r = CONTAINER.create(inputs)
                    assert r.id == inputs["name"]
                    w.inputs[(slug, role)], w.outs[(slug, role)] = inputs, r.outs
        w.sampler = sampler
        yield w
    finally:
        cleanup(sandbox, SLUGS)


def name_of(slug: str, role: str) -> str:
    return f"dn-{slug}-{role}"


def leftovers(sandbox, slug: str, role: str) -> list[str]:
    return [n for n in (name_of(slug, role) + hd.NEXT, name_of(slug, role) + hd.PREV) if exists(sandbox, "container", n)]


def health(sandbox, ref: str) -> str:
    return docker_json(sandbox, "container", "inspect", ref)["State"]["Health"]["Status"]


def http_from(sandbox, container: str, ip: str, port: int = 8080, timeout: int = 3):
    """GET /healthz from inside ``container`` (busybox nc: its wget crashes on -T in this build)."""
    script = 'printf "GET /healthz HTTP/1.0\\r\\n\\r\\n" | nc -w "$0" "$1" "$2"'
    return sandbox.docker(["exec", container, "sh", "-c", script, str(timeout), ip, str(port)], check=False)


# --------------------------------------------------------------------------- creation


def test_networks_are_bridges_without_icc(sandbox, world):
    for slug, t in world.tenants.items():
        net = docker_json(sandbox, "network", "inspect", t.network)
        assert net["Driver"] == "bridge"
        assert net["Options"]["com.docker.network.bridge.enable_icc"] == "false"
        assert net["Options"]["com.docker.network.bridge.name"] == t.bridge
        assert net["IPAM"]["Config"] == [{"Subnet": t.subnet, "Gateway": t.gateway}]
        assert net["Labels"] == {"dn.tenant": slug, "dn.managed": "true"}
        # the fixed bridge name is what the firewall chains match
        assert sandbox.ns_exec(["ip", "-o", "link", "show", t.bridge]).returncode == 0
        assert world.net_outs[slug]["observed"]["icc"] is False
        assert NETWORK.diff(t.network, world.net_outs[slug], world.net_inputs[slug]).changes is False


def test_containers_are_hardened(sandbox, world):
    for (slug, role), outs in world.outs.items():
        t = world.tenants[slug]
        c = docker_json(sandbox, "container", "inspect", name_of(slug, role))
        hc = c["HostConfig"]
        assert c["State"]["Running"] and c["State"]["Health"]["Status"] == "healthy"
        assert not hc.get("PortBindings") and hc["PublishAllPorts"] is False
        assert all(not b for b in (c["NetworkSettings"]["Ports"] or {}).values())  # nothing published
        assert list(c["NetworkSettings"]["Networks"]) == [t.network]  # only the tenant network
        ip = t.tagging_address if role == "tagging" else t.preview_address
        assert c["NetworkSettings"]["Networks"][t.network]["IPAddress"] == ip
        assert hc["CapDrop"] == ["ALL"] and not hc.get("CapAdd") and hc["Privileged"] is False
        assert "no-new-privileges:true" in hc["SecurityOpt"]
        assert hc["Memory"] == hc["MemorySwap"] == 64 * 1024 * 1024 and hc["NanoCpus"] == 250_000_000
        assert hc["ReadonlyRootfs"] is True and "/tmp" in hc["Tmpfs"]
        assert hc["RestartPolicy"]["Name"] == "unless-stopped"
        assert hc["LogConfig"] == {"Type": "json-file", "Config": {"max-file": "3", "max-size": "10m"}}
        assert c["Config"]["Healthcheck"]["Test"] == hd.default_health_test()
        assert c["Config"]["Labels"]["dn.tenant"] == slug and c["Config"]["Labels"]["dn.role"] == role
        env = c["Config"]["Env"]
        assert f"CONTAINER_CONFIG={world.secrets[slug]}" in env  # the secret did arrive
        assert ("RUN_AS_PREVIEW_SERVER=true" in env) == (role == "preview")
        assert (f"PREVIEW_SERVER_URL=https://tags.{slug}.example/_dn/preview" in env) == (role == "tagging")
        # the read-only root really is read-only, /tmp is writable
        assert sandbox.docker(["exec", c["Id"], "sh", "-c", "echo x > /probe"], check=False).returncode != 0
        assert sandbox.docker(["exec", c["Id"], "sh", "-c", "echo x > /tmp/probe"]).returncode == 0
        # what dn recorded matches, and a diff against the same inputs finds nothing
        assert outs["container_id"] == c["Id"] and outs["observed"]["running"] is True
        assert CONTAINER.diff(outs["name"], outs, world.inputs[(slug, role)]).changes is False


def test_the_secret_never_reaches_argv_or_outputs(world):
    s = world.sampler
    assert s.passes > 10 and s.dial_stdio > 0, "the sampler never saw dn's docker commands: it proves nothing"
    assert s.hits == [], f"a secret appeared in a process's argv: {s.hits[:3]}"
    for (slug, role), outs in world.outs.items():
        text = json.dumps(outs)
        assert world.secrets[slug] not in text and "secret_env" not in outs
        assert outs["observed"]["env"]["CONTAINER_CONFIG"] == hd.secret_digest(world.secrets[slug])


# --------------------------------------------------------------------------- isolation


def test_containers_cannot_reach_each_other(sandbox, world):
    a, b = (world.tenants[s] for s in SLUGS)
    a_tag, a_prev, b_tag = name_of(a.slug, "tagging"), name_of(a.slug, "preview"), name_of(b.slug, "tagging")
    # the probes work: each container answers itself, and the host reaches every container
    assert http_from(sandbox, a_tag, "127.0.0.1").stdout.endswith(b"\r\n\r\nok")
    for ip in (a.preview_address, b.tagging_address, b.preview_address):
        assert sandbox.ns_exec(hd.probe_argv(ip, 8080), check=False).returncode == 0
    # ICC off: not even the tenant's own other container; and never another tenant's
    for src, ip in ((a_tag, a.preview_address), (a_tag, b.tagging_address), (a_prev, b.preview_address),
                    (b_tag, a.tagging_address), (b_tag, b.preview_address)):
        r = http_from(sandbox, src, ip)
        assert r.returncode != 0 and r.stdout == b"", f"{src} reached {ip}"
        assert b"timed out" in r.stderr, r.stderr  # dropped, not refused: the packets never arrive


# --------------------------------------------------------------------------- updates


def test_changed_memory_recreates_and_stays_healthy(sandbox, world):
    slug, role = SLUGS[0], "tagging"
    olds, news = world.outs[(slug, role)], {**world.inputs[(slug, role)], "memory_mb": 96}
    d = CONTAINER.diff(olds["name"], olds, news)
    assert d.changes is True and d.replaces == []
    r = CONTAINER.update(olds["name"], olds, news)
    c = docker_json(sandbox, "container", "inspect", name_of(slug, role))
    assert c["Id"] == r.outs["container_id"] != olds["container_id"]
    assert c["HostConfig"]["Memory"] == 96 * 1024 * 1024 and c["State"]["Health"]["Status"] == "healthy"
    assert not exists(sandbox, "container", olds["container_id"])
    assert leftovers(sandbox, slug, role) == []
    assert CONTAINER.diff(olds["name"], r.outs, news).changes is False
    world.inputs[(slug, role)], world.outs[(slug, role)] = news, r.outs


def test_update_to_a_missing_image_leaves_the_old_container_running(sandbox, world):
    slug, role = SLUGS[0], "tagging"
    olds = world.outs[(slug, role)]
    news = {**world.inputs[(slug, role)], "image": "dn.local/does-not-exist:1"}
    assert CONTAINER.diff(olds["name"], olds, news).changes is True
    with pytest.raises(hd.ImageMissing) as ei:
        CONTAINER.update(olds["name"], olds, news)
    assert all(s not in str(ei.value) for s in world.secrets.values())
    assert "dn.local/does-not-exist:1" in str(ei.value) and "left as it was" in str(ei.value)
    c = docker_json(sandbox, "container", "inspect", name_of(slug, role))
    assert c["Id"] == olds["container_id"] and c["State"]["Running"] and c["State"]["Health"]["Status"] == "healthy"
    assert leftovers(sandbox, slug, role) == []


def test_unhealthy_update_rolls_back_to_the_previous_container(sandbox, world):
    slug, role = SLUGS[0], "tagging"
    olds = world.outs[(slug, role)]
    broken = {**FAST_HEALTH, "test": ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:9/healthz"]}
    news = {**world.inputs[(slug, role)], "health": broken}
    with pytest.raises(hd.RolloutFailed) as ei:
        CONTAINER.update(olds["name"], olds, news)
    assert all(s not in str(ei.value) for s in world.secrets.values())
    assert "is not healthy" in str(ei.value) and "previous one is back and healthy" in str(ei.value)
    c = docker_json(sandbox, "container", "inspect", name_of(slug, role))
    assert c["Id"] == olds["container_id"] and c["State"]["Running"] and c["State"]["Health"]["Status"] == "healthy"
    assert c["Config"]["Healthcheck"]["Test"] == hd.default_health_test()
    assert leftovers(sandbox, slug, role) == []
    # it serves again on its address
    assert sandbox.ns_exec(hd.probe_argv(world.tenants[slug].tagging_address, 8080), check=False).returncode == 0


def test_a_container_stopped_by_hand_is_drift_and_up_repairs_it(sandbox, world):
    slug, role = SLUGS[1], "preview"
    name = name_of(slug, role)
    sandbox.docker(["stop", "-t", "2", name])
    outs = world.outs[(slug, role)]
    r = CONTAINER.read(name, outs)
    assert r.id == name and r.outs["observed"]["running"] is False
    assert world.secrets[slug] not in json.dumps(r.outs)
    d = CONTAINER.diff(name, r.outs, world.inputs[(slug, role)])
    assert d.changes is True and d.replaces == []
    u = CONTAINER.update(name, r.outs, world.inputs[(slug, role)])
    assert u.outs["observed"]["running"] is True and health(sandbox, name) == "healthy"
    world.outs[(slug, role)] = u.outs


def test_a_foreign_container_of_the_same_name_is_refused(sandbox, ssh_data):
    slug = EXTRA_SLUGS[1]
    cleanup(sandbox, [slug])
    try:
        (subnet,) = free_subnets(sandbox, 1)
        t = tenant(slug, subnet, new_secret())
        NETWORK.create({**hd.tenant_network_inputs(t), "ssh": ssh_data})
        foreign = sandbox.docker(["create", "--name", name_of(slug, "tagging"), "--network", "none",
                                  "dn.local/sgtm-standin:1"]).stdout.decode().strip()
        with pytest.raises(OperationFailed) as ei:
            CONTAINER.create(container_inputs(t, "tagging", ssh_data, new_secret()))
        assert "is not dn's" in str(ei.value) and "nothing was changed" in str(ei.value)
        assert docker_json(sandbox, "container", "inspect", name_of(slug, "tagging"))["Id"] == foreign
        assert leftovers(sandbox, slug, "tagging") == []
    finally:
        cleanup(sandbox, [slug])


def test_without_a_health_check_the_host_probes_healthz(sandbox, ssh_data):
    from dn import ssh

    slug = EXTRA_SLUGS[1]
    cleanup(sandbox, [slug])
    try:
        (subnet,) = free_subnets(sandbox, 1)
        t = tenant(slug, subnet, new_secret())
        NETWORK.create({**hd.tenant_network_inputs(t), "ssh": ssh_data})
        spec = hd.container_spec(hd.tenant_container_inputs(t, "tagging", health={"test": ["NONE"]}, wait_s=30))
        with ssh.connect(sandbox.host) as s:
            done = hd.deploy_container(s, spec, {"CONTAINER_CONFIG": new_secret()})
        assert done.observed["health"] is None and done.observed["running"] is True
        assert any("GET /healthz answered 200" in n for n in done.notes), done.notes
        assert "Health" not in docker_json(sandbox, "container", "inspect", spec.name)["State"]
    finally:
        cleanup(sandbox, [slug])


def test_a_create_that_never_gets_healthy_leaves_nothing(sandbox, ssh_data):
    slug = EXTRA_SLUGS[1]
    cleanup(sandbox, [slug])
    try:
        (subnet,) = free_subnets(sandbox, 1)
        t = tenant(slug, subnet, new_secret())
        NETWORK.create({**hd.tenant_network_inputs(t), "ssh": ssh_data})
        broken = {**FAST_HEALTH, "test": ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:9/healthz"]}
        with pytest.raises(hd.RolloutFailed) as ei:
            CONTAINER.create(container_inputs(t, "tagging", ssh_data, new_secret(), health=broken))
        assert "there was no previous one" in str(ei.value)
        assert not exists(sandbox, "container", name_of(slug, "tagging"))
        assert leftovers(sandbox, slug, "tagging") == []
    finally:
        cleanup(sandbox, [slug])


def test_an_interrupted_deploy_is_recovered_by_the_next(sandbox, ssh_data):
    from dn import ssh

    slug = EXTRA_SLUGS[1]
    cleanup(sandbox, [slug])
    try:
        (subnet,) = free_subnets(sandbox, 1)
        secret = new_secret()
        t = tenant(slug, subnet, secret)
        NETWORK.create({**hd.tenant_network_inputs(t), "ssh": ssh_data})
        inputs = container_inputs(t, "tagging", ssh_data, secret)
        first = CONTAINER.create(inputs)
        name = inputs["name"]
        # dn died between "stop and rename the old one" and "start the new one"
        sandbox.docker(["stop", "-t", "2", name])
        sandbox.docker(["rename", name, name + hd.PREV])
        sandbox.docker(["create", "--name", name + hd.NEXT, "--network", "none", "dn.local/sgtm-standin:1"])
        with ssh.connect(sandbox.host) as s:
            done = hd.deploy_container(s, hd.container_spec(inputs), {"CONTAINER_CONFIG": secret})
        assert f"removed {name + hd.NEXT} (left by an interrupted deploy)" in done.notes
        assert f"restored {name} from {name + hd.PREV} (left by an interrupted deploy)" in done.notes
        assert done.observed["id"] == first.outs["container_id"]  # the restored one was as declared
        assert leftovers(sandbox, slug, "tagging") == []
        c = docker_json(sandbox, "container", "inspect", name)
        assert c["State"]["Running"] and c["Id"] == first.outs["container_id"]
    finally:
        cleanup(sandbox, [slug])


# --------------------------------------------------------------------------- network drift


def test_network_recreated_by_hand_with_icc_is_detected_and_replaced(sandbox, ssh_data):
    slug = EXTRA_SLUGS[0]
    cleanup(sandbox, [slug])
    try:
        (subnet,) = free_subnets(sandbox, 1)
        t = tenant(slug, subnet, new_secret())
        inputs = {**hd.tenant_network_inputs(t), "ssh": ssh_data}
        created = NETWORK.create(inputs)
        assert NETWORK.diff(t.network, created.outs, inputs).changes is False
        # someone recreates it by hand, identical except inter-container traffic allowed
        sandbox.docker(["network", "rm", t.network])
        sandbox.docker(["network", "create", "--driver", "bridge", "--subnet", t.subnet, "--gateway", t.gateway,
                        "--opt", f"com.docker.network.bridge.name={t.bridge}",
                        "--opt", "com.docker.network.bridge.enable_icc=true",
                        "--label", f"dn.tenant={slug}", "--label", "dn.managed=true", t.network])
        read = NETWORK.read(t.network, created.outs)
        assert read.id == t.network and read.outs["observed"]["icc"] is True
        assert read.outs["network_id"] != created.outs["network_id"]
        d = NETWORK.diff(t.network, read.outs, inputs)
        assert d.changes is True and d.replaces == ["icc"] and d.delete_before_replace is True
        # creating over it refuses rather than adopting a network that differs
        with pytest.raises(OperationFailed) as ei:
            NETWORK.create(inputs)
        assert "icc: want false, have true" in str(ei.value)
        # the replacement the engine runs: delete, then create
        NETWORK.delete(t.network, read.outs)
        again = NETWORK.create(inputs)
        net = docker_json(sandbox, "network", "inspect", t.network)
        assert net["Options"]["com.docker.network.bridge.enable_icc"] == "false" and again.outs["observed"]["icc"] is False
    finally:
        cleanup(sandbox, [slug])


# --------------------------------------------------------------------------- delete


def test_delete_refuses_a_network_with_containers_then_cleans_up(sandbox, world):
    for slug in SLUGS:
        t = world.tenants[slug]
        if slug == SLUGS[1]:  # stopped containers count too: docker would leave them dangling
            for role in ("tagging", "preview"):
                sandbox.docker(["stop", "-t", "2", name_of(slug, role)])
        with pytest.raises(OperationFailed) as ei:
            NETWORK.delete(t.network, world.net_outs[slug])
        assert "still has containers attached" in str(ei.value)
        assert name_of(slug, "tagging") in str(ei.value) and name_of(slug, "preview") in str(ei.value)
        assert exists(sandbox, "network", t.network)
        for role in ("tagging", "preview"):
            CONTAINER.delete(name_of(slug, role), world.outs[(slug, role)])
            assert not exists(sandbox, "container", name_of(slug, role))
            assert CONTAINER.read(name_of(slug, role), world.outs[(slug, role)]).id is None
            CONTAINER.delete(name_of(slug, role), world.outs[(slug, role)])  # already gone: fine
        NETWORK.delete(t.network, world.net_outs[slug])
        assert not exists(sandbox, "network", t.network)
        assert sandbox.ns_exec(["ip", "link", "show", t.bridge], check=False).returncode != 0
        assert NETWORK.read(t.network, world.net_outs[slug]).id is None


# --------------------------------------------------------------------------- through the engine


def _engine_missing() -> str | None:
    from dn import tooling

    prov = tooling.status()
    if not all(t.present for t in prov.tools if t.name in ("pulumi", tooling.DYNAMIC_LAUNCHER)):
        return f"the Pulumi CLI v{tooling.PULUMI_VERSION} is not provisioned (dn setup)"
    return None


@pytest.mark.engine
def test_through_the_engine_secret_stays_encrypted(sandbox, ssh_data, tmp_path):
    reason = _engine_missing()
    if reason:
        pytest.skip(reason)
    import pulumi

    from dn import engine
    from dn.config import load_settings

    slug = EXTRA_SLUGS[2]
    cleanup(sandbox, [slug])
    home = tmp_path / "dn"
    (home / "sandbox").mkdir(parents=True)
    (home / "sandbox" / "passphrase").write_text("docker provider test passphrase\n")
    (home / "sandbox" / "passphrase").chmod(0o600)
    env = dict(os.environ, DN_HOME=str(home), XDG_CONFIG_HOME=str(tmp_path / "config"))
    settings = load_settings(environ=env)
    secret = new_secret()
    (subnet,) = free_subnets(sandbox, 1)
    t = tenant(slug, subnet, secret)

    def program(memory: int, spec=t):
        def run() -> None:
            from stacks.providers.docker import tenant_docker

            net, ctrs = tenant_docker(spec.model_copy(update={"limits": PlanConfig(memory_mb=memory, cpus=0.25)}),
                                      ssh_data, pulumi.Output.secret(secret), health=FAST_HEALTH, wait_s=60)
            pulumi.export("network", net.name)
            pulumi.export("containers", [c.name for c in ctrs])
        return run

    extra = {"PYTHONPATH": str(REPO)}
    st = engine.stack(settings, "docker-provider", program(64), extra_env=extra, environ=env)
    try:
        first = engine.up(st)
        assert first.changes.get("create") == 4  # the stack, the network, two containers
        assert first.outputs["containers"] == [name_of(slug, "tagging"), name_of(slug, "preview")]
        assert health(sandbox, name_of(slug, "tagging")) == "healthy"
        again = engine.up(st)
        assert again.changed == 0
        st = engine.stack(settings, "docker-provider", program(96), extra_env=extra, environ=env)
        changed = engine.up(st)
        assert changed.changes.get("update") == 2 and not changed.changes.get("replace")
        c = docker_json(sandbox, "container", "inspect", name_of(slug, "preview"))
        assert c["HostConfig"]["Memory"] == 96 * 1024 * 1024 and c["State"]["Health"]["Status"] == "healthy"
        sandbox.docker(["stop", "-t", "2", name_of(slug, "tagging")])
        assert engine.refresh(st).changes.get("update", 0) >= 1
        assert engine.up(st).changes.get("update") == 1  # the stopped container is recreated
        assert health(sandbox, name_of(slug, "tagging")) == "healthy"
        # a new subnet replaces the network (deleting first); the containers on it go and come back
        (moved,) = free_subnets(sandbox, 1)
        t2 = tenant(slug, moved, secret)
        st = engine.stack(settings, "docker-provider", program(96, t2), extra_env=extra, environ=env)
        planned = engine.preview(st)
        assert planned.changes.get("replace") == 3, planned.changes  # network + both containers
        assert exists(sandbox, "network", t.network) and health(sandbox, name_of(slug, "tagging")) == "healthy"
        replaced = engine.up(st)
        assert replaced.changes.get("replace") == 3, replaced.changes
        n = docker_json(sandbox, "network", "inspect", t.network)
        assert [c["Subnet"] for c in n["IPAM"]["Config"]] == [moved]
        c = docker_json(sandbox, "container", "inspect", name_of(slug, "tagging"))
        assert c["NetworkSettings"]["Networks"][t.network]["IPAddress"] == t2.tagging_address
        assert health(sandbox, name_of(slug, "tagging")) == "healthy"
        assert engine.up(st).changed == 0
        hits = [p for p in Path(settings.data_dir).rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
        assert hits == [], f"the secret is in plain text in {hits}"
        state = list(Path(settings.backend_url[len("file://"):]).rglob("docker-provider.json"))
        assert state and "ciphertext" in state[0].read_text()
        gone = engine.destroy(st, remove=True)
        assert gone.changes.get("delete") == 4
        assert not exists(sandbox, "network", t.network)
        assert not exists(sandbox, "container", name_of(slug, "tagging"))
    finally:
        cleanup(sandbox, [slug])
