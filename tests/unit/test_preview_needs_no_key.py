"""A preview needs no SSH key (why CI's pull-request preview is given none: .github/workflows/preview.yml).

During a preview the engine calls only ``check`` and ``diff`` of dn's dynamic providers (``read``
is a refresh's, ``create``/``update``/``delete`` an update's). Each provider is called here with a
host target whose key file does not exist and with dn.ssh's connect replaced by one that records
the attempt and refuses: none may try to reach the host, for an unchanged, a changed and a
replaced resource alike.
"""
from __future__ import annotations

import base64

import pytest

from dn import ssh
from dn.host import docker as hd
from dn.models import HostBaseline, host_view_data
from stacks.providers.docker import SECRET_KEY, DockerContainerProvider, DockerNetworkProvider
from stacks.providers.firewall import FirewallBaselineProvider, TenantFirewallProvider
from stacks.providers.luks import LuksVolumeProvider, encode_key
from stacks.providers.nginx import NginxBaseProvider, NginxVhostProvider
from stacks.providers.timers import SystemdTimerProvider
from tests.integration.test_nginx_apply import tenant

KEYLESS = {"address": "10.231.1.2", "port": 22, "user": "root", "key_path": "/nonexistent/dn-preview/id_ed25519",
           "host_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ"}


@pytest.fixture
def no_ssh(monkeypatch):
    tried = []

    def refuse(*args, **kwargs):
        tried.append(args)
        raise AssertionError("a preview opened SSH")

    monkeypatch.setattr(ssh, "connect", refuse)
    return tried


def _host(tmp_path) -> dict:
    from tests.fixtures.sandbox import TEST_DATA, sandbox_settings

    return HostBaseline.from_settings(sandbox_settings(TEST_DATA), dn_bin="/usr/local/bin/dn").model_dump(mode="json")


def _cases(tmp_path):
    t = tenant("pvk", "10.210.51.0/28")
    base = {"ssh": KEYLESS, "host": _host(tmp_path)}
    with_tenant = {**base, "tenant": host_view_data(t)}
    key = encode_key(bytes(range(64)))
    net = {**hd.tenant_network_inputs(t), "ssh": KEYLESS}
    box = {**hd.tenant_container_inputs(t, "tagging"), "network": f"dn-t-{t.slug}", "ssh": KEYLESS,
           SECRET_KEY: {"CONTAINER_CONFIG": base64.b64encode(b"cfg").decode()}, "container_id": None, "observed": None}
    return [
        (NginxBaseProvider(), {**base, "digest": None, "files": None}),
        (NginxVhostProvider(), {**with_tenant, "digest": None, "files": None}),
        (FirewallBaselineProvider(), {**base, "digest": None, "drift": None}),
        (TenantFirewallProvider(), {**with_tenant, "other_bridges": [], "digest": None, "drift": None}),
        (LuksVolumeProvider(), {**with_tenant, "key": key}),
        (SystemdTimerProvider(), {**with_tenant, "unit": f"dn-backup-{t.slug}"}),
        (DockerNetworkProvider(), net),
        (DockerContainerProvider(), box),
    ]


def test_check_and_diff_of_every_provider_open_no_ssh(no_ssh, tmp_path):
    cases = _cases(tmp_path)
    assert {type(p).__name__ for p, _ in cases} >= {
        "NginxBaseProvider", "NginxVhostProvider", "FirewallBaselineProvider", "TenantFirewallProvider",
        "LuksVolumeProvider", "SystemdTimerProvider", "DockerNetworkProvider", "DockerContainerProvider"}
    for provider, news in cases:
        name = type(provider).__name__
        checked = provider.check({}, news)
        assert checked.failures == [], (name, checked.failures)
        # a resource seen before with other outputs (changed), and with a different host prefix
        for olds in ({**news, "digest": "0" * 64, "spec": {}, "observed": None},
                     {**news, "host": {**news.get("host", {}), "prefix": "/elsewhere"}, "digest": "0" * 64}):
            provider.diff("id", olds, news)
    assert no_ssh == []
