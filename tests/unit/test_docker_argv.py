"""dn.host.docker's pure core: input validation, argv builders, the Engine API create request, the
inspect parsers and plans (on inspect JSON recorded from the sandbox's dockerd, tests/data/docker,
see record.py there), the backend choice, and the dynamic providers' check/diff (no SSH involved).
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dn import tooling
from dn.config import PlanConfig, Settings, embedded_default
from dn.errors import ConfigError, InvalidInput
from dn.host import docker as hd
from dn.models import parse_tenant

DATA = Path(__file__).resolve().parents[1] / "data" / "docker"
FAKE_SECRET = "ZmFrZS1jb250YWluZXItY29uZmlnLWZvci10ZXN0cw=="  # the value record.py used
IMAGE = "dn.local/sgtm-standin:1"
NET = "dn-t-dkr-rec"


def recorded(name: str) -> dict:
    objs = hd.parse_inspect((DATA / name).read_text())
    assert len(objs) == 1
    return objs[0]


def net_data(**over) -> dict:
    data = {"name": NET, "tenant": "dkr-rec", "bridge": "dntrecord0001", "subnet": "10.210.239.0/28",
            "gateway": "10.210.239.1"}
    data.update(over)
    return data


def ctr_data(**over) -> dict:
    """The spec record.py deployed as dn-dkr-rec-tagging."""
    data = {"name": "dn-dkr-rec-tagging", "tenant": "dkr-rec", "role": "tagging", "image": IMAGE, "network": NET,
            "ipv4": "10.210.239.2", "memory_mb": 96, "cpus": 0.5,
            "env": {"PORT": "8080", "PREVIEW_SERVER_URL": "https://t.example/_dn/preview"},
            "health": {"test": hd.default_health_test(), "interval_s": 1, "timeout_s": 2, "retries": 2,
                       "start_period_s": 0},
            "wait_s": 30}
    data.update(over)
    return data


SECRET_ENV = {"CONTAINER_CONFIG": FAKE_SECRET}
DIGESTS = hd.secret_digests(SECRET_ENV)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("over, field, rule", [
    ({"name": "-bad"}, "name", "Docker object name"),
    ({"name": None}, "name", "is required"),
    ({"tenant": "Bad Slug"}, "tenant", "lower-case"),
    ({"bridge": "a-bridge-name-too-long"}, "bridge", "1-15 characters"),
    ({"bridge": "br/0"}, "bridge", "interface name"),
    ({"subnet": "10.210.239.1/28"}, "subnet", "host bits zero"),
    ({"subnet": "10.210.239.0/30", "gateway": "10.210.239.1"}, "subnet", "/29 or larger"),
    ({"gateway": "10.210.240.1"}, "gateway", "inside 10.210.239.0/28"),
    ({"gateway": "10.210.239.0"}, "gateway", "host address"),
    ({"gateway": "nope"}, "gateway", "not an IPv4 address"),
    ({"labels": {"dn.tenant": "other"}}, "labels.dn.tenant", "set by dn itself"),
    ({"labels": {"Bad Key": "x"}}, "labels.Bad Key", "label keys"),
    ({"labels": {"team": "a\nb"}}, "labels.team", "newline"),
])
def test_network_spec_rejects(over, field, rule):
    with pytest.raises(InvalidInput) as ei:
        hd.network_spec(net_data(**over))
    assert ei.value.field == field and rule in ei.value.rule


@pytest.mark.parametrize("over, field, rule", [
    ({"role": "worker"}, "role", "tagging, preview"),
    ({"image": "dn.local/Bad:1"}, "image", "not a valid image reference"),
    ({"ipv4": "10.210.239.300"}, "ipv4", "not an IPv4 address"),
    ({"memory_mb": "512"}, "memory_mb", "integer"),
    ({"memory_mb": True}, "memory_mb", "integer"),
    ({"memory_mb": 64.5}, "memory_mb", "integer"),
    ({"cpus": True}, "cpus", "must be a number"),
    ({"memory_mb": 8}, "memory_mb", "16..262144"),
    ({"cpus": 0}, "cpus", "0.01..64"),
    ({"cpus": 0.1234}, "cpus", "3 decimals"),
    ({"port": 0}, "port", "1..65535"),
    ({"env": {"1X": "y"}}, "env.1X", "variable names"),
    ({"env": {"X": "a\nb"}}, "env.X", "newline"),
    ({"env": {"X": 1}}, "env.X", "string"),
    ({"env": {"CONTAINER_CONFIG": "visible"}}, "env.CONTAINER_CONFIG", "secret variable"),
    ({"health": {"test": "wget x"}}, "health.test", "list of strings"),
    ({"health": {"test": ["CMD"]}}, "health.test", 'start with "CMD"'),
    ({"health": {"test": ["CMD-SHELL", "a", "b"]}}, "health.test", 'start with "CMD"'),
    ({"health": {"test": ["NONE"], "interval_s": 0.5}}, "health.interval_s", "1..3600"),
    ({"health": {"test": ["NONE"], "retries": 0}}, "health.retries", "1..100"),
    ({"health": {"test": ["NONE"], "every": 3}}, "health.every", "unknown field"),
    ({"pids_limit": 4}, "pids_limit", "16..1000000"),
    ({"read_only": "yes"}, "read_only", "true or false"),
    ({"tmpfs": {"/tmp": "rw,exec;rm"}}, "tmpfs./tmp", "options"),
    ({"tmpfs": {"/../etc": "rw"}}, "tmpfs./../etc", "without '..'"),
    ({"log_max_size": "10 MB"}, "log_max_size", "size like 10m"),
    ({"log_max_file": 0}, "log_max_file", "1..100"),
    ({"pull": "always"}, "pull", "never, missing"),
    ({"wait_s": 0}, "wait_s", "1..3600"),
    ({"name": "x" * 60}, "name", "1-56 characters"),
])
def test_container_spec_rejects(over, field, rule):
    with pytest.raises(InvalidInput) as ei:
        hd.container_spec(ctr_data(**over))
    assert ei.value.field == field and rule in ei.value.rule


@pytest.mark.parametrize("secret_env, field, rule", [
    ({}, "secret_env.CONTAINER_CONFIG", "is required"),
    ({"CONTAINER_CONFIG": FAKE_SECRET, "OTHER": "x"}, "secret_env.OTHER", "not listed"),
    ({"CONTAINER_CONFIG": ""}, "secret_env.CONTAINER_CONFIG", "non-empty"),
    ({"CONTAINER_CONFIG": FAKE_SECRET + "\nINJECTED=1"}, "secret_env.CONTAINER_CONFIG", "newline"),
    ("CONTAINER_CONFIG=x", "secret_env", "mapping"),
])
def test_secret_env_rejected_without_showing_it(secret_env, field, rule):
    spec = hd.container_spec(ctr_data())
    with pytest.raises(InvalidInput) as ei:
        hd.check_secret_env(spec, secret_env)
    assert ei.value.field == field and rule in ei.value.rule
    assert FAKE_SECRET not in str(ei.value)


def test_specs_accept_valid_input():
    net = hd.network_spec(net_data(labels={"team": "a"}))
    assert net.all_labels == {"team": "a", "dn.tenant": "dkr-rec", "dn.managed": "true"}
    spec = hd.container_spec(ctr_data(secret_env_keys=["CONTAINER_CONFIG", "OTHER_TOKEN"]))
    assert spec.secret_env_keys == ("CONTAINER_CONFIG", "OTHER_TOKEN")
    assert spec.all_labels[hd.LABEL_SECRET_ENV] == "CONTAINER_CONFIG,OTHER_TOKEN"
    assert spec.health.enabled and not hd.health_spec({"test": ["NONE"]}).enabled
    assert spec.tmpfs == hd.DEFAULT_TMPFS and spec.read_only and spec.pull == "never"
    # the engine delivers every number as a float
    floats = hd.container_spec(ctr_data(memory_mb=96.0, port=8080.0, pids_limit=100.0, log_max_file=2.0,
                                        health={"test": ["NONE"], "retries": 2.0}))
    assert (floats.memory_mb, floats.port, floats.pids_limit, floats.log_max_file, floats.health.retries) == \
        (96, 8080, 100, 2, 2)
    assert all(type(v) is int for v in (floats.memory_mb, floats.port, floats.pids_limit, floats.log_max_file))


# --------------------------------------------------------------------------- argv


def test_network_argv():
    spec = hd.network_spec(net_data(labels={"team": "a"}))
    assert hd.network_create_argv(spec) == [
        "docker", "network", "create", "--driver", "bridge", "--subnet", "10.210.239.0/28",
        "--gateway", "10.210.239.1", "--opt", "com.docker.network.bridge.name=dntrecord0001",
        "--opt", "com.docker.network.bridge.enable_icc=false",
        "--label", "dn.managed=true", "--label", "dn.tenant=dkr-rec", "--label", "team=a", "--", NET,
    ]
    assert hd.network_inspect_argv(NET) == ["docker", "network", "inspect", "--", NET]
    assert hd.network_rm_argv(NET) == ["docker", "network", "rm", "--", NET]
    assert hd.network_containers_argv("b63a") == ["docker", "ps", "--all", "--no-trunc", "--filter", "network=b63a",
                                                  "--format", "{{.Names}}"]


@pytest.mark.parametrize("fn, args, expected", [
    (hd.container_inspect_argv, ("c1",), ["docker", "container", "inspect", "--", "c1"]),
    (hd.container_start_argv, ("c1",), ["docker", "container", "start", "--", "c1"]),
    (hd.container_stop_argv, ("c1",), ["docker", "container", "stop", "--time", "10", "--", "c1"]),
    (hd.container_stop_argv, ("c1", 3), ["docker", "container", "stop", "--time", "3", "--", "c1"]),
    (hd.container_rename_argv, ("c1", "c1-dn-prev"), ["docker", "container", "rename", "--", "c1", "c1-dn-prev"]),
    (hd.container_rm_argv, ("c1",), ["docker", "container", "rm", "--force", "--", "c1"]),
    (hd.image_inspect_argv, (IMAGE,), ["docker", "image", "inspect", "--format", "{{.Id}}", "--", IMAGE]),
    (hd.image_pull_argv, (IMAGE,), ["docker", "image", "pull", "--quiet", "--", IMAGE]),
])
def test_container_argv(fn, args, expected):
    assert fn(*args) == expected


def test_probe_argv_passes_values_as_positional_parameters():
    argv = hd.probe_argv("10.210.239.2", 8080)
    assert argv[:4] == ["timeout", "5", "bash", "-c"] and argv[5:] == ["dn-probe", "10.210.239.2", "8080", "/healthz"]
    assert "10.210.239.2" not in argv[4]  # the script itself holds no value
    with pytest.raises(ValueError):
        hd.probe_argv("10.210.239.2; reboot", 8080)
    with pytest.raises(InvalidInput):
        hd.probe_argv("10.210.239.2", 8080, "/x y")


def test_probe_script_speaks_http(tmp_path):
    """The probe's bash script against a real local HTTP server (loopback)."""
    import http.server
    import threading

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            self.send_response(200 if self.path == "/healthz" else 503)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        port = srv.server_address[1]
        assert subprocess.run(hd.probe_argv("127.0.0.1", port)).returncode == 0
        assert subprocess.run(hd.probe_argv("127.0.0.1", port, "/other")).returncode != 0
    finally:
        srv.shutdown()
    free = srv.server_address[1]  # closed now: connection refused
    assert subprocess.run(hd.probe_argv("127.0.0.1", free), capture_output=True).returncode != 0


# --------------------------------------------------------------------------- Engine API create


def test_create_body_carries_the_whole_spec():
    spec = hd.container_spec(ctr_data(health={"test": ["CMD", "/nodejs/bin/node", "-e", "probe()"],
                                              "interval_s": 30, "timeout_s": 5, "retries": 3, "start_period_s": 20}))
    body = hd.create_body(spec, SECRET_ENV)
    assert body["Image"] == IMAGE
    assert body["Env"] == ["PORT=8080", "PREVIEW_SERVER_URL=https://t.example/_dn/preview",
                           f"CONTAINER_CONFIG={FAKE_SECRET}"]
    assert body["Healthcheck"] == {"Test": ["CMD", "/nodejs/bin/node", "-e", "probe()"], "Interval": 30 * 10**9,
                                   "Timeout": 5 * 10**9, "Retries": 3, "StartPeriod": 20 * 10**9}
    hc = body["HostConfig"]
    assert hc["PortBindings"] == {} and hc["PublishAllPorts"] is False and body["ExposedPorts"] == {}
    assert hc["CapDrop"] == ["ALL"] and hc["CapAdd"] == [] and hc["SecurityOpt"] == ["no-new-privileges:true"]
    assert hc["Memory"] == hc["MemorySwap"] == 96 * 1024 * 1024 and hc["NanoCpus"] == 500_000_000
    assert hc["RestartPolicy"]["Name"] == "unless-stopped" and hc["ReadonlyRootfs"] is True
    assert hc["Tmpfs"] == hd.DEFAULT_TMPFS and hc["PidsLimit"] == 512 and hc["Privileged"] is False
    assert hc["LogConfig"] == {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}}
    assert hc["NetworkMode"] == NET
    assert body["NetworkingConfig"] == {"EndpointsConfig": {NET: {"IPAMConfig": {"IPv4Address": "10.210.239.2"}}}}
    assert body["Labels"] == {"dn.managed": "true", "dn.role": "tagging", "dn.secret-env": "CONTAINER_CONFIG",
                              "dn.env": "PORT,PREVIEW_SERVER_URL", "dn.tenant": "dkr-rec"}


def test_create_body_without_health_check():
    body = hd.create_body(hd.container_spec(ctr_data(health={"test": ["NONE"]})), SECRET_ENV)
    assert body["Healthcheck"] == {"Test": ["NONE"]}


def test_create_request_is_one_http_request():
    spec = hd.container_spec(ctr_data())
    raw = hd.create_request(spec, SECRET_ENV, "dn-dkr-rec-tagging-dn-next")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /containers/create?name=dn-dkr-rec-tagging-dn-next HTTP/1.0"
    assert f"Content-Length: {len(body)}" in lines and "Content-Type: application/json" in lines
    assert json.loads(body) == hd.create_body(spec, SECRET_ENV)
    assert hd.http_request("GET", "/containers/x/json") == b"GET /containers/x/json HTTP/1.0\r\nHost: docker\r\n\r\n"


@pytest.mark.parametrize("name, status, check", [
    ("http-create-201.txt", 201, lambda b: len(b["Id"]) == 64 and b["Warnings"] == []),
    ("http-404.txt", 404, lambda b: b["message"] == "No such container: dn-dkr-rec-absent"),
    ("http-create-no-image.txt", 404, lambda b: b["message"] == "No such image: dn.local/absent:1"),
])
def test_parse_recorded_api_answers(name, status, check):
    got, body = hd.parse_http_response((DATA / name).read_bytes())
    assert got == status and check(body)


def test_parse_http_response_chunked_and_garbage():
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n"
    assert hd.parse_http_response(chunked) == (200, {"a": 1})
    with pytest.raises(Exception) as ei:
        hd.parse_http_response(b"not http at all")
    assert "not HTTP" in str(ei.value)


# --------------------------------------------------------------------------- inspect parsers and plans


def test_parse_inspect_rejects_non_lists():
    assert hd.parse_inspect("[]") == []
    for bad in ("{}", "nope", "[1]"):
        with pytest.raises(Exception):
            hd.parse_inspect(bad)


@pytest.mark.parametrize("value, default, expected", [
    (None, True, True), ("false", True, False), ("0", True, False), ("F", True, False), ("true", False, True),
    ("1", False, True), ("maybe", True, True), ("maybe", False, False),
])
def test_parse_bool_like_docker(value, default, expected):
    assert hd.parse_bool(value, default) is expected


def test_recorded_tenant_network_matches_its_spec():
    obs = hd.normalize_network(recorded("network-tenant.json"))
    assert obs["icc"] is False and obs["bridge"] == "dntrecord0001" and obs["driver"] == "bridge"
    assert obs["ipam"] == [{"subnet": "10.210.239.0/28", "gateway": "10.210.239.1"}]
    assert obs["labels"] == {"dn.managed": "true", "dn.tenant": "dkr-rec"} and obs["ip_masquerade"] is True
    spec = hd.network_spec(net_data())
    assert hd.plan_network(spec, obs).empty
    assert [c.action for c in hd.plan_network(spec, None).changes] == ["create"]


@pytest.mark.parametrize("over, fields", [
    ({"subnet": "10.210.239.16/28", "gateway": "10.210.239.17"}, ["ipam"]),
    ({"bridge": "dntother"}, ["bridge"]),
    ({"tenant": "other-tenant"}, ["labels.dn.tenant"]),
    ({"labels": {"team": "a"}}, ["labels.team"]),
])
def test_network_plan_lists_each_difference(over, fields):
    plan = hd.plan_network(hd.network_spec(net_data(**over)), hd.normalize_network(recorded("network-tenant.json")))
    assert [c.target for c in plan.changes] == fields and {c.action for c in plan.changes} == {"replace"}


def test_hand_made_network_with_icc_is_drift():
    obs = hd.normalize_network(recorded("network-icc-enabled.json"))
    assert obs["icc"] is True and obs["bridge"] is None
    spec = hd.network_spec(net_data(name="dn-t-dkr-rec-icc", subnet="10.210.239.16/28", gateway="10.210.239.17"))
    plan = hd.plan_network(spec, obs)
    assert [c.target for c in plan.changes] == ["ipam", "bridge", "icc", "labels.dn.managed"]
    icc = next(c for c in plan.changes if c.target == "icc")
    assert icc.reason == "want false, have true"


def test_recorded_container_matches_its_spec_and_hides_the_secret():
    obs = hd.normalize_container(recorded("container-tagging.json"))
    assert FAKE_SECRET not in json.dumps(obs)
    assert obs["env"]["CONTAINER_CONFIG"] == hd.secret_digest(FAKE_SECRET)
    assert obs["published"] == [] and obs["publish_all"] is False and obs["networks"] == [NET]
    assert obs["cap_drop"] == ["ALL"] and obs["security_opt"] == ["no-new-privileges:true"]
    assert obs["memory_mb"] == 96 and obs["memory_swap_mb"] == 96 and obs["cpus"] == 0.5
    assert obs["read_only"] is True and obs["tmpfs"] == hd.DEFAULT_TMPFS and obs["running"] is True
    assert obs["ipv4"] == {NET: "10.210.239.2"} and obs["restart"] == "unless-stopped"
    spec = hd.container_spec(ctr_data())
    assert hd.differences(hd.expected_container(spec, DIGESTS), obs, secret_keys=spec.secret_env_keys) == []
    assert hd.plan_container(spec, DIGESTS, obs).empty


@pytest.mark.parametrize("over, secret, fields", [
    ({"memory_mb": 128}, SECRET_ENV, ["memory_mb", "memory_swap_mb"]),
    ({"cpus": 1.0}, SECRET_ENV, ["cpus"]),
    ({"image": "dn.local/sgtm-standin:2"}, SECRET_ENV, ["image"]),
    ({"ipv4": "10.210.239.5"}, SECRET_ENV, ["ipv4"]),
    ({"env": {"PORT": "8081", "PREVIEW_SERVER_URL": "https://t.example/_dn/preview"}}, SECRET_ENV, ["env.PORT"]),
    ({}, {"CONTAINER_CONFIG": "b3RoZXItc2VjcmV0LXZhbHVlLTEyMw=="}, ["env.CONTAINER_CONFIG"]),
    ({"health": {"test": ["NONE"]}}, SECRET_ENV, ["health"]),
    ({"read_only": False, "pids_limit": 100}, SECRET_ENV, ["pids_limit", "read_only"]),
    ({"log_max_file": 5}, SECRET_ENV, ["log"]),
    # preview turned off: the tagging container must lose PREVIEW_SERVER_URL, not keep a stale one
    ({"env": {"PORT": "8080"}}, SECRET_ENV, ["labels.dn.env"]),
])
def test_container_plan_lists_each_difference(over, secret, fields):
    obs = hd.normalize_container(recorded("container-tagging.json"))
    spec = hd.container_spec(ctr_data(**over))
    plan = hd.plan_container(spec, hd.secret_digests(secret), obs)
    assert [c.target for c in plan.changes] == fields and {c.action for c in plan.changes} == {"recreate"}
    for c in plan.changes:  # neither the value nor its digest is ever shown
        assert FAKE_SECRET not in c.reason and "sha256:" not in c.reason


def test_hand_made_container_shows_every_hardening_gap():
    obs = hd.normalize_container(recorded("container-cli-published.json"))
    assert obs["published"] == ["127.0.0.1:18080->8080/tcp"]
    assert obs["security_opt"] == ["no-new-privileges:true"]  # the CLI's spelling, normalized
    assert obs["env"]["CONTAINER_CONFIG"] == hd.secret_digest("hand-made")  # digested without dn's label
    assert obs["running"] is False
    spec = hd.container_spec(ctr_data(name="dn-dkr-rec-cli"))
    fields = [c.target for c in hd.plan_container(spec, DIGESTS, obs).changes]
    for f in ("running", "published", "cap_drop", "cap_add", "restart", "memory_mb", "read_only", "health",
              "env.CONTAINER_CONFIG", "labels.dn.managed", "ipv4"):
        assert f in fields


def test_secret_keys_from_the_label_are_digested():
    obj = recorded("container-tagging.json")
    obj["Config"]["Env"].append("OTHER_TOKEN=tok-visible-nowhere")
    obj["Config"]["Labels"][hd.LABEL_SECRET_ENV] = "CONTAINER_CONFIG,OTHER_TOKEN"
    obs = hd.normalize_container(obj)
    assert obs["env"]["OTHER_TOKEN"] == hd.secret_digest("tok-visible-nowhere")
    assert "tok-visible-nowhere" not in json.dumps(obs)


@pytest.mark.parametrize("name, probe, ok, detail", [
    ("container-tagging.json", None, True, "healthy"),
    ("container-unhealthy.json", None, False, "failed 2 times in a row (last exit code 1: wget: can't connect"),
    ("container-exited.json", None, False, "exited with code 3"),
    ("container-cli-published.json", None, False, "exited with code 0"),
    ("container-no-healthcheck.json", lambda: True, True, "GET /healthz answered 200"),
    ("container-no-healthcheck.json", lambda: False, None, None),
])
def test_health_verdicts(name, probe, ok, detail):
    verdict = hd.health_of(recorded(name), probe)
    if ok is None:
        assert verdict is None
    else:
        assert verdict.ok is ok and detail in verdict.detail


def test_a_restarting_container_has_failed():
    obj = recorded("container-tagging.json")
    obj["RestartCount"] = 2
    assert hd.health_of(obj).ok is False and "restarting" in hd.health_of(obj).detail
    obj = recorded("container-no-healthcheck.json")
    obj["State"]["Health"] = {"Status": "starting"}
    assert hd.health_of(obj, lambda: True) is None  # a health check decides once there is one


def test_scrub():
    assert hd.scrub(f"error: {FAKE_SECRET} refused", [FAKE_SECRET]) == "error: [secret] refused"
    assert hd.scrub("abc", ["ab"]) == "abc"  # too short to be worth hiding


# --------------------------------------------------------------------------- tenant inputs


PLANS = {"standard": PlanConfig(memory_mb=256, cpus=0.5)}


def tenant(**over):
    data = {"slug": "acme", "domains": ["tags.acme.example"], "image": IMAGE,
            "container_config": FAKE_SECRET, "subnet": "10.210.0.0/28"}
    data.update(over)
    return parse_tenant(data, plans=PLANS)


def test_tenant_inputs_follow_the_model():
    t = tenant()
    net = hd.network_spec(hd.tenant_network_inputs(t))
    assert (net.name, net.bridge, net.subnet, net.gateway, net.tenant) == (t.network, t.bridge, t.subnet, t.gateway,
                                                                          "acme")
    tagging = hd.container_spec(hd.tenant_container_inputs(t, "tagging"))
    preview = hd.container_spec(hd.tenant_container_inputs(t, "preview", pull="missing"))
    assert (tagging.name, tagging.ipv4, tagging.network) == ("dn-acme-tagging", "10.210.0.2", "dn-t-acme")
    assert (preview.name, preview.ipv4, preview.pull) == ("dn-acme-preview", "10.210.0.3", "missing")
    assert tagging.env == {"PORT": "8080", "PREVIEW_SERVER_URL": "https://tags.acme.example/_dn/preview"}
    assert preview.env == {"PORT": "8080", "RUN_AS_PREVIEW_SERVER": "true"}
    assert tagging.memory_mb == 256 and tagging.cpus == 0.5 and tagging.secret_env_keys == ("CONTAINER_CONFIG",)
    no_preview = hd.container_spec(hd.tenant_container_inputs(tenant(preview=False), "tagging"))
    assert "PREVIEW_SERVER_URL" not in no_preview.env
    node = ["CMD", "/nodejs/bin/node", "-e", "probe()"]
    assert hd.container_spec(hd.tenant_container_inputs(t, "tagging", health_test=node)).health.test == tuple(node)


def test_preview_url_needs_a_plain_domain():
    t = tenant(domains=["*.acme.example", "tags.acme.example"], allow_wildcard=True)
    assert hd.preview_server_url(t) == "https://tags.acme.example/_dn/preview"
    with pytest.raises(InvalidInput) as ei:
        hd.preview_server_url(tenant(domains=["*.acme.example"], allow_wildcard=True))
    assert ei.value.field == "domains"


# --------------------------------------------------------------------------- backend choice


@pytest.fixture
def backend_env(tmp_path):
    settings = Settings.model_validate(embedded_default(tmp_path / "data"))
    env = {k: v for k, v in os.environ.items() if k != hd.BACKEND_ENV}
    env["PATH"] = "/usr/bin:/bin"  # no pulumi-resource-docker anywhere on it
    return settings, env


def _install_fake_plugin(settings) -> Path:
    """An executable where dn looks for the pulumi-docker plugin (its presence is what counts)."""
    d = tooling.plugin_dir(tooling.pulumi_home(Path(settings.data_dir)), "resource", "docker",
                           tooling.DOCKER_PLUGIN_VERSION)
    d.mkdir(parents=True)
    exe = d / "pulumi-resource-docker"
    exe.write_text("#!/bin/sh\nexit 1\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_backend_follows_the_plugin(backend_env):
    settings, env = backend_env
    assert hd.docker_backend(settings, env) == "dn-ssh"
    _install_fake_plugin(settings)
    assert hd.docker_backend(settings, env) == "pulumi-docker"
    assert hd.docker_backend(settings, {**env, hd.BACKEND_ENV: "dn-ssh"}) == "dn-ssh"
    assert hd.docker_backend(settings, {**env, hd.BACKEND_ENV: "auto"}) == "pulumi-docker"


def test_backend_override_errors(backend_env):
    settings, env = backend_env
    with pytest.raises(ConfigError) as ei:
        hd.docker_backend(settings, {**env, hd.BACKEND_ENV: "pulumi-docker"})
    assert "not installed" in str(ei.value) and ei.value.hint
    with pytest.raises(InvalidInput) as ei:
        hd.docker_backend(settings, {**env, hd.BACKEND_ENV: "docker-cli"})
    assert ei.value.field == hd.BACKEND_ENV and "auto, pulumi-docker, dn-ssh" in ei.value.rule


# --------------------------------------------------------------------------- the providers' check and diff


UNKNOWN = "04da6b54-80e4-46f7-96ec-b56ff0331ba9"  # pulumi.runtime.rpc.UNKNOWN
SSH = {"address": "10.231.1.2", "port": 22, "user": "root", "key_path": "/nonexistent/key",
       "known_hosts": "/nonexistent/known_hosts"}


def container_outs(**over) -> dict:
    return {**ctr_data(**over), "ssh": SSH, "observed": hd.normalize_container(recorded("container-tagging.json"))}


def test_container_provider_diff():
    from stacks.providers.docker import DockerContainerProvider

    p = DockerContainerProvider()
    news = {**ctr_data(), "ssh": SSH, "secret_env": dict(SECRET_ENV)}
    olds = container_outs()
    assert "secret_env" not in olds
    d = p.diff("c", olds, news)
    assert d.changes is False and d.replaces == []
    d = p.diff("c", olds, {**news, "ssh": {**SSH, "port": 2222}})
    assert d.changes is False  # how dn reaches the host is not part of the container
    d = p.diff("c", olds, {**news, "memory_mb": 128})
    assert d.changes is True and d.replaces == []  # recreated in place, with rollback
    d = p.diff("c", olds, {**news, "secret_env": {"CONTAINER_CONFIG": "bmV3LXNlY3JldC12YWx1ZS0xMjM0"}})
    assert d.changes is True and d.replaces == []
    d = p.diff("c", olds, {**news, "name": "dn-dkr-rec-other"})
    assert d.changes is True and d.replaces == ["name"] and d.delete_before_replace is True
    d = p.diff("c", olds, {**news, "network": UNKNOWN})
    assert d.changes is True and d.replaces == ["network"] and d.delete_before_replace is True
    stopped = container_outs()
    stopped["observed"]["running"] = False
    assert p.diff("c", stopped, news).changes is True


def test_network_provider_diff_replaces_on_drift():
    from stacks.providers.docker import DockerNetworkProvider

    p = DockerNetworkProvider()
    news = {**net_data(), "ssh": SSH}
    olds = {**news, "observed": hd.normalize_network(recorded("network-tenant.json"))}
    assert p.diff("n", olds, news).changes is False
    drifted = {**olds, "observed": {**olds["observed"], "icc": True}}
    d = p.diff("n", drifted, news)
    assert d.changes is True and d.replaces == ["icc"] and d.delete_before_replace is True
    d = p.diff("n", olds, {**news, "subnet": UNKNOWN})
    assert d.replaces == ["subnet"]


def test_provider_check_names_the_field():
    from stacks.providers.docker import DockerContainerProvider, DockerNetworkProvider

    news = {**ctr_data(memory_mb="lots"), "ssh": SSH, "secret_env": dict(SECRET_ENV)}
    r = DockerContainerProvider().check({}, news)
    assert [(f.property, f.reason) for f in r.failures] == [("memory_mb", "must be an integer within 16..262144")]
    r = DockerContainerProvider().check({}, {**ctr_data(), "ssh": SSH, "secret_env": {"CONTAINER_CONFIG": "a\nb"}})
    assert r.failures[0].property == "secret_env.CONTAINER_CONFIG" and "a\nb" not in r.failures[0].reason
    r = DockerNetworkProvider().check({}, {**net_data(), "ssh": {"address": "10.231.1.2", "key_path": "/k"}})
    assert r.failures and r.failures[0].property.startswith("ssh")
    assert DockerNetworkProvider().check({}, {**net_data(), "ssh": SSH}).failures == []
    assert DockerNetworkProvider().check({}, {**net_data(gateway=UNKNOWN), "ssh": SSH}).failures == []


def test_pure_module_imports_no_adapters():
    code = ("import sys, dn.host.docker\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'typer', 'rich', 'paramiko', 'psycopg', 'pulumi'})\n"
            "print(','.join(bad))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == ""
