"""The tenant program under Pulumi's mocks (preview=False, so every apply runs): every resource
property that carries a promise of the trust page, for several tenants at once and for both docker
backends, the secrets staying secrets on the wire, and dn's policies over every registered resource.
"""
from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pulumi
import pytest

from tests.stacks import mocking  # sets up nothing by itself; run() calls set_mocks per program

pulumi.runtime.set_mocks(mocking.Mocks(mocking.Recording()), project="dn", stack="import", preview=False)

from dn.config import Settings, embedded_default  # noqa: E402
from dn.models import host_view_data, parse_tenant  # noqa: E402
from policies import validators as v  # noqa: E402
from stacks import programs  # noqa: E402
from stacks.tenant import LOG_MAX_FILES, LOG_MAX_SIZE, health_test  # noqa: E402

CONTAINER_CONFIG = {
    "acme": "YWNtZS1jb250YWluZXItY29uZmlnLXNlY3JldA==",
    "globex": "Z2xvYmV4LWNvbnRhaW5lci1jb25maWctc2VjcmV0",
    "initech": "aW5pdGVjaC1jb250YWluZXItY29uZmlnLXNlY3JldA",
}
LUKS_KEY = {
    slug: __import__("base64").b64encode(bytes([i + 1]) * 64).decode() for i, slug in enumerate(CONTAINER_CONFIG)
}
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHlrjtCmhNvUnp9bYXi2+5i0lc8wDWJgk7ETwoZUSAuW"
BACKENDS = ("pulumi-docker", "dn-ssh")


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    data = tmp_path_factory.mktemp("dn")
    base = embedded_default(data)
    base["hosts"]["sandbox-eu1"].pop("known_hosts")
    base["hosts"]["sandbox-eu1"]["host_key"] = HOST_KEY
    base["plans"] = {
        "standard": {},
        "large": {"rate_per_ip": 50, "burst_per_ip": 0, "rate_per_tenant": 2000, "burst_per_tenant": 4000,
                  "conn_per_ip": 200, "cpus": 2.5, "memory_mb": 2048, "volume_mb": 4096},
    }
    return Settings.model_validate({**base, "source": "tests/stacks"})


def specs(settings: Settings):
    raw = [
        {"slug": "acme", "domains": ["gtm.acme.example", "sgtm.acme.example"], "plan": "standard",
         "subnet": "10.210.0.0/28"},
        {"slug": "globex", "domains": ["t.globex.example"], "plan": "large", "preview": False,
         "backup_schedule": "*-*-* 01:15:00", "subnet": "10.210.0.16/28"},
        {"slug": "initech", "domains": ["*.initech.example", "initech.example"], "allow_wildcard": True,
         "plan": "standard", "image": "gcr.io/cloud-tagging-10302018/gtm-cloud-image:2.5.0", "subnet": "10.210.0.32/28"},
    ]
    out = []
    for r in raw:
        data = {"image": settings.images.sgtm, **r, "container_config": CONTAINER_CONFIG[r["slug"]]}
        out.append(parse_tenant(data, plans=settings.plans, allowed_registries=settings.images.allowed_registries))
    return out


def run_tenant(settings: Settings, spec, others, backend: str) -> tuple[mocking.Recording, dict]:
    inputs = programs.tenant_inputs(settings, spec.model_copy(update={"container_config": None}), others,
                                    environ={"DN_DOCKER_BACKEND": backend} if backend == "dn-ssh" else None)
    inputs = programs.TenantInputs(**{**inputs.__dict__, "docker_backend": backend})
    def body():
        _component, outputs = programs.declare_tenant(inputs)
        return outputs

    return mocking.run(body, stack=spec.slug,
                       config={"dn:containerConfig": CONTAINER_CONFIG[spec.slug], "dn:luksKey": LUKS_KEY[spec.slug]},
                       secret_keys=["dn:containerConfig", "dn:luksKey"])


_DEPLOYED: dict[str, dict] = {}


def deploy(settings: Settings, backend: str) -> dict:
    """Each tenant's program run on its own (one stack per tenant), for one docker backend."""
    if backend not in _DEPLOYED:
        all_specs = specs(settings)
        out = {}
        for spec in all_specs:
            others = [s for s in all_specs if s.slug != spec.slug]
            rec, outputs = run_tenant(settings, spec, others, backend)
            rec.outputs["stack"] = outputs
            out[spec.slug] = (spec, rec)
        _DEPLOYED[backend] = out
    return _DEPLOYED[backend]


@pytest.fixture(scope="module", params=BACKENDS)
def deployed(request, settings):
    return request.param, deploy(settings, request.param)


@pytest.fixture(scope="module")
def pulumi_docker(settings):
    return deploy(settings, "pulumi-docker")


@pytest.fixture(scope="module")
def dn_ssh(settings):
    return deploy(settings, "dn-ssh")


def _no_none(d):
    if isinstance(d, dict):
        return {k: _no_none(x) for k, x in d.items() if x is not None}
    if isinstance(d, (list, tuple)):
        return [_no_none(x) for x in d]
    return d


def _policy_resources(rec: mocking.Recording) -> list[v.Resource]:
    return [v.Resource(r.type, r.name, r.inputs, r.urn) for r in rec.resources]


def _ctr(backend, rec, slug, role):
    return rec.by_name(f"{slug}-{role}")


# --------------------------------------------------------------------------- structure


def test_one_component_with_one_child_per_promise(deployed):
    backend, tenants = deployed
    for slug, (spec, rec) in tenants.items():
        comp = rec.by_name(slug)
        assert comp.type == "dn:tenant:Tenant"
        children = sorted(r.name for r in rec.resources if r.short_parent == slug)
        expected = {f"{slug}-network", f"{slug}-tagging", f"{slug}-firewall", f"{slug}-nginx-vhost",
                    f"{slug}-luks-volume", f"{slug}-backup-timer"}
        if spec.preview:
            expected.add(f"{slug}-preview")
        if backend == "pulumi-docker":
            expected.add(f"{slug}-docker")
        assert set(children) == expected, children


def test_names_subnets_and_bridges_are_distinct_across_tenants(deployed):
    _backend, tenants = deployed
    bridges, subnets, networks, chains = set(), [], set(), set()
    for slug, (spec, rec) in tenants.items():
        assert len(spec.bridge) <= 15 and spec.bridge.startswith("dnt")
        bridges.add(spec.bridge)
        networks.add(spec.network)
        chains.add(spec.chain_forward)
        subnets.append(ipaddress.IPv4Network(spec.subnet))
    assert len(bridges) == len(networks) == len(chains) == len(tenants)
    for i, a in enumerate(subnets):
        assert not any(a.overlaps(b) for b in subnets[i + 1:])


# --------------------------------------------------------------------------- docker: pulumi-docker


def test_pulumi_docker_provider_pins_the_host_key(pulumi_docker, settings):
    tenants = pulumi_docker
    for slug, (_spec, rec) in tenants.items():
        p = rec.by_name(f"{slug}-docker")
        assert p.type == "pulumi:providers:docker"
        assert p.inputs["host"] == settings.host().docker_url == "ssh://root@10.231.1.2:22"
        opts = p.inputs["sshOpts"]
        if isinstance(opts, str):  # provider configuration travels JSON-encoded
            opts = json.loads(opts)
        kh = opts[opts.index("-o", 0) + 1]
        assert kh.startswith("UserKnownHostsFile=")
        known = Path(kh.split("=", 1)[1])
        assert known.read_text() == f"10.231.1.2 {HOST_KEY}\n" and (known.stat().st_mode & 0o777) == 0o600
        assert "StrictHostKeyChecking=yes" in opts and "GlobalKnownHostsFile=/dev/null" in opts
        assert opts[opts.index("-i") + 1] == str(settings.host().key_path)
        # every docker resource of the tenant goes through this provider
        for r in rec.resources:
            if r.type.startswith("docker:index/"):
                assert r.wire.get("provider") is None  # the provider reference travels outside the inputs
                assert r.short_parent == slug


def test_pulumi_docker_network_promises(pulumi_docker):
    tenants = pulumi_docker
    for slug, (spec, rec) in tenants.items():
        n = rec.by_name(f"{slug}-network")
        assert n.type == "docker:index/network:Network"
        assert n.inputs["name"] == f"dn-t-{slug}" and n.inputs["driver"] == "bridge"
        assert n.inputs["options"] == {"com.docker.network.bridge.name": spec.bridge,
                                       "com.docker.network.bridge.enable_icc": "false",
                                       "com.docker.network.bridge.enable_ip_masquerade": "true"}
        assert {"label": "dn.tenant", "value": slug} in n.inputs["labels"]
        assert n.inputs["ipamConfigs"] == [{"subnet": spec.subnet, "gateway": spec.gateway}]
        assert n.inputs["internal"] is False and n.inputs["ipv6"] is False


def test_pulumi_docker_container_promises(pulumi_docker):
    tenants = pulumi_docker
    for slug, (spec, rec) in tenants.items():
        roles = ("tagging", "preview") if spec.preview else ("tagging",)
        for role in roles:
            c = rec.by_name(f"{slug}-{role}")
            i = c.inputs
            assert c.type == "docker:index/container:Container"
            assert i["name"] == f"dn-{slug}-{role}" and i["image"] == spec.image
            assert "ports" not in i and i["publishAllPorts"] is False
            assert i["restart"] == "unless-stopped"
            assert i["memory"] == spec.limits.memory_mb and i["memorySwap"] == spec.limits.memory_mb
            assert float(i["cpus"]) == spec.limits.cpus
            assert i["capabilities"] == {"drops": ["ALL"]}
            assert i["securityOpts"] == ["no-new-privileges:true"] and i["privileged"] is False
            assert i["readOnly"] is True
            assert i["logDriver"] == "json-file"
            assert i["logOpts"] == {"max-size": LOG_MAX_SIZE, "max-file": LOG_MAX_FILES}
            assert i["healthcheck"]["tests"] == health_test(spec.image)
            assert any("/healthz" in t for t in i["healthcheck"]["tests"])
            # attached only to the tenant network, at its fixed address
            assert i["networkMode"] == spec.network
            addr = spec.tagging_address if role == "tagging" else spec.preview_address
            assert i["networksAdvanced"] == [{"name": spec.network, "ipv4Address": addr}]
            assert c.urn.split("::")[-2].endswith("docker:index/container:Container")
            network_urn = rec.by_name(f"{slug}-network").urn
            assert network_urn in c.dependencies


def _env(rec, slug, role) -> dict[str, str]:
    """The resolved environment (mocks echo inputs) of a container, either backend."""
    c = rec.by_name(f"{slug}-{role}")
    if c.type == "docker:index/container:Container":
        return dict(e.split("=", 1) for e in mocking.reveal(c.inputs["envs"]))
    return {**c.inputs["env"], **mocking.reveal(c.inputs["secret_env"])}


def test_preview_server_wiring(deployed):
    _backend, tenants = deployed
    acme_spec, acme = tenants["acme"]
    assert _env(acme, "acme", "tagging")["PREVIEW_SERVER_URL"] == "https://gtm.acme.example/_dn/preview"
    assert _env(acme, "acme", "preview")["RUN_AS_PREVIEW_SERVER"] == "true"
    assert "PREVIEW_SERVER_URL" not in _env(acme, "acme", "preview")
    _spec, globex = tenants["globex"]  # preview server off
    assert "PREVIEW_SERVER_URL" not in _env(globex, "globex", "tagging")
    assert "globex-preview" not in globex.names()
    # a wildcard first domain is never a URL: the first plain domain is used
    _spec, initech = tenants["initech"]
    assert _env(initech, "initech", "tagging")["PREVIEW_SERVER_URL"] == "https://initech.example/_dn/preview"
    for slug, (spec, rec) in tenants.items():
        assert _env(rec, slug, "tagging")["CONTAINER_CONFIG"] == CONTAINER_CONFIG[slug]
        assert _env(rec, slug, "tagging")["PORT"] == "8080"


def test_official_sgtm_image_gets_a_shell_free_health_check(deployed):
    _backend, tenants = deployed
    spec, _rec = tenants["initech"]
    test = health_test(spec.image)
    assert test[:2] == ["CMD", "/nodejs/bin/node"] and "/healthz" in test[-1]
    assert health_test("dn.local/sgtm-standin:1")[:2] == ["CMD", "wget"]


# --------------------------------------------------------------------------- docker: dn-ssh


def test_dn_ssh_network_and_container_promises(dn_ssh, settings):
    tenants = dn_ssh
    from dn.host import docker as hd

    for slug, (spec, rec) in tenants.items():
        n = rec.by_name(f"{slug}-network")
        assert n.type == "pulumi-python:dynamic:Resource"
        net = hd.expected_network(hd.network_spec(n.inputs))
        assert net["bridge"] == spec.bridge and net["icc"] is False and net["driver"] == "bridge"
        assert net["ipam"] == [{"subnet": spec.subnet, "gateway": spec.gateway}]
        assert net["labels"]["dn.tenant"] == slug
        assert n.inputs["ssh"] == programs.ssh_target_data(settings.host())
        for role in ("tagging", "preview") if spec.preview else ("tagging",):
            c = rec.by_name(f"{slug}-{role}")
            assert n.urn in c.dependencies
            view = hd.expected_container(hd.container_spec(c.inputs), {})
            assert view["published"] == [] and view["publish_all"] is False
            assert view["restart"] == "unless-stopped"
            assert view["memory_mb"] == view["memory_swap_mb"] == spec.limits.memory_mb
            assert view["cpus"] == spec.limits.cpus
            assert view["cap_drop"] == ["ALL"] and view["cap_add"] == []
            assert view["security_opt"] == ["no-new-privileges:true"] and view["privileged"] is False
            assert view["log"]["driver"] == "json-file" and view["log"]["opts"]["max-file"] == "3"
            assert view["health"]["test"] == health_test(spec.image)
            assert view["networks"] == [spec.network] and view["network_mode"] == spec.network
            assert view["ipv4"] == {spec.network: spec.tagging_address if role == "tagging" else spec.preview_address}


# --------------------------------------------------------------------------- host resources


def test_host_resources_carry_the_tenant_and_host(deployed, settings):
    _backend, tenants = deployed
    from dn.models import HostBaseline

    host = HostBaseline.from_settings(settings).model_dump(mode="json")
    for slug, (spec, rec) in tenants.items():
        view = host_view_data(spec)
        for suffix in ("firewall", "nginx-vhost", "luks-volume", "backup-timer"):
            r = rec.by_name(f"{slug}-{suffix}")
            assert r.type == "pulumi-python:dynamic:Resource"
            # None values do not travel (Pulumi drops them)
            assert r.inputs["host"] == _no_none(host) and r.inputs["tenant"] == _no_none(view)
            assert r.inputs["ssh"] == programs.ssh_target_data(settings.host())
            assert "container_config" not in r.inputs["tenant"]
        fw = rec.by_name(f"{slug}-firewall")
        # the chains exist before the network and before any container starts (both backends)
        assert not fw.dependencies
        for first in [f"{slug}-network", f"{slug}-tagging"] + ([f"{slug}-preview"] if spec.preview else []):
            assert fw.urn in rec.by_name(first).dependencies, first
        vhost = rec.by_name(f"{slug}-nginx-vhost")
        assert rec.by_name(f"{slug}-tagging").urn in vhost.dependencies
        timer = rec.by_name(f"{slug}-backup-timer")
        assert timer.inputs["unit"] == f"dn-backup-{slug}"
        assert timer.inputs["schedules"] == settings.schedules.model_dump(mode="json")
        assert timer.inputs["tenant"]["backup_schedule"] == spec.backup_schedule
        vol = rec.by_name(f"{slug}-luks-volume")
        assert mocking.reveal(vol.inputs["key"]) == LUKS_KEY[slug]
    # the plan's limits reach the vhost and the volume
    spec, rec = tenants["globex"]
    limits = rec.by_name("globex-nginx-vhost").inputs["tenant"]["limits"]
    assert (limits["rate_per_ip"], limits["rate_per_tenant"], limits["conn_per_ip"]) == (50, 2000, 200)
    assert rec.by_name("globex-luks-volume").inputs["tenant"]["limits"]["volume_mb"] == 4096


# --------------------------------------------------------------------------- secrets


def test_secrets_are_secret_on_the_wire_and_nowhere_in_plain_text(deployed):
    _backend, tenants = deployed
    for slug, (_spec, rec) in tenants.items():
        cfg, key = CONTAINER_CONFIG[slug], LUKS_KEY[slug]
        holders = {r.name for r in rec.resources if mocking.wire_secret(r.wire, cfg)}
        expected = {f"{slug}-tagging"} | ({f"{slug}-preview"} if f"{slug}-preview" in rec.names() else set())
        assert holders == expected
        assert {r.name for r in rec.resources if mocking.wire_secret(r.wire, key)} == {f"{slug}-luks-volume"}
        for r in rec.resources:
            assert mocking.wire_plain(r.wire, cfg) == [], (r.name, mocking.wire_plain(r.wire, cfg))
            assert mocking.wire_plain(r.wire, key) == [], r.name
        # no other tenant's secret is anywhere in this tenant's stack
        for other, other_cfg in CONTAINER_CONFIG.items():
            if other != slug:
                assert not any(other_cfg in str(r.wire) for r in rec.resources)


def test_stack_outputs_hold_no_secret(deployed):
    _backend, tenants = deployed
    for slug, (spec, rec) in tenants.items():
        stack = rec.outputs["stack"]
        assert stack["tenant"] == slug and stack["subnet"] == spec.subnet and stack["bridge"] == spec.bridge
        assert stack["domains"] == list(spec.domains) and stack["network"] == spec.network
        assert stack["containers"] == [spec.tagging_container] + ([spec.preview_container] if spec.preview else [])
        assert CONTAINER_CONFIG[slug] not in json.dumps(rec.outputs)
        assert LUKS_KEY[slug] not in json.dumps(rec.outputs)


def test_the_component_refuses_an_unknown_backend(settings):
    from stacks.tenant import DockerEndpoint, Tenant, TenantArgs

    spec = specs(settings)[0]

    def body():
        Tenant(TenantArgs(spec=spec, host=None, docker=DockerEndpoint("ssh://x", "/k", "/kh"),
                          container_config=pulumi.Output.secret("x" * 16), luks_key=pulumi.Output.secret("k"),
                          docker_backend="podman"))
        return {}

    with pytest.raises(Exception, match="docker_backend 'podman'"):
        mocking.run(body, stack="acme")


# --------------------------------------------------------------------------- policies


def test_every_policy_passes_over_every_tenants_resources(deployed):
    _backend, tenants = deployed
    ran: dict[str, int] = {}
    for slug, (_spec, rec) in tenants.items():
        resources = _policy_resources(rec)
        assert v.validate_all(resources) == [], slug
        for name, applied in v.applicable(resources).items():
            ran[name] = ran.get(name, 0) + len(applied)
    # every tenant policy really ran over this backend's resources (host-only ones are in test_host_stack)
    for name in ("dn-no-published-ports", "dn-container-hardening", "dn-allowed-registries",
                 "dn-network-icc-disabled", "dn-tls-hsts", "dn-rate-limits", "dn-luks", "dn-backup-schedule"):
        assert ran.get(name, 0) >= 3, (name, ran)


def test_policies_catch_a_tampered_tenant(deployed):
    """The same resources with one promise broken each: every policy names the resource."""
    backend, tenants = deployed
    _spec, rec = tenants["acme"]
    res = {r.name: r for r in _policy_resources(rec)}

    def tampered(name, **changes) -> v.Resource:
        r = res[name]
        return v.Resource(r.type, r.name, {**r.props, **changes}, r.urn)

    def policies(r: v.Resource) -> set[str]:
        return {x.policy for x in v.validate(r)}

    tag = res["acme-tagging"]
    if backend == "pulumi-docker":
        assert "dn-no-published-ports" in policies(tampered("acme-tagging", ports=[{"internal": 8080, "external": 8080}]))
        caps = tampered("acme-tagging", capabilities={"drops": ["NET_ADMIN"]})
        assert "dn-container-hardening" in policies(caps)
        net = res["acme-network"]
        icc = dict(net.props["options"], **{"com.docker.network.bridge.enable_icc": "true"})
        assert "dn-network-icc-disabled" in policies(tampered("acme-network", options=icc))
    else:
        assert "dn-container-hardening" in policies(tampered("acme-tagging", memory_mb=0))
        # what the host really runs (a refresh) counts: a port published behind dn's back
        observed = {"published": ["0.0.0.0:8080->8080/tcp"], "cap_drop": []}
        assert {"dn-no-published-ports", "dn-container-hardening"} <= policies(tampered("acme-tagging", observed=observed))
        assert "dn-network-icc-disabled" in policies(tampered("acme-network", observed={"icc": True}))
    assert "dn-allowed-registries" in policies(tampered("acme-tagging", image="docker.io/library/nginx:1"))
    del tag
    # the host resources: a tenant whose limits or schedule break the promises
    vhost = res["acme-nginx-vhost"]
    weak_host = {**vhost.props["host"], "hsts_max_age": 600}
    # HostBaseline itself refuses a short HSTS: the policy reports the input as uncheckable
    assert policies(tampered("acme-nginx-vhost", host=weak_host)) == {"dn-tls-hsts", "dn-rate-limits"}
    weekly = {**res["acme-backup-timer"].props["tenant"], "backup_schedule": "Mon *-*-* 02:00:00"}
    found = v.validate(tampered("acme-backup-timer", tenant=weekly))
    assert [x.policy for x in found] == ["dn-backup-schedule"] and "every day" in found[0].message
    assert [x.policy for x in v.validate(res["acme-backup-timer"], v.Config(retention_days=14))] == ["dn-backup-schedule"]
    assert v.validate(tampered("acme-luks-volume", header={"cipher": "aes-cbc-essiv:sha256", "key_bits": 256}))
