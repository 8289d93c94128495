"""The preview model's pure helpers: flattening and diffing inputs, masking secrets, kinds."""
from __future__ import annotations

import pytest

from dn import preview as pv

SECRET = {"4dabf18193072939515e22adb298388d": "1b47061264138c4ac30d75fd1eb44270", "ciphertext": "[secret]"}


def test_flatten_paths_and_leaves():
    assert pv.flatten({"a": {"b": [1, {"c": 2}]}, "e": [], "s": SECRET}) == {
        "a.b[0]": 1, "a.b[1].c": 2, "e": [], "s": "[secret]"}
    assert pv.flatten({}) == {} and pv.flatten([]) == {}


def test_diff_inputs_adds_updates_deletes_and_skips_the_provider():
    old = {"__provider": SECRET, "limits": {"rate": 10, "burst": 20}, "domains": ["a.example", "b.example"],
           "key": SECRET}
    new = {"__provider": SECRET, "limits": {"rate": 20, "burst": 20}, "domains": ["a.example"], "key": SECRET,
           "preview": True}
    got = [(c.path, c.how, c.old, c.new, c.replaces) for c in pv.diff_inputs(old, new, ["domains"])]
    assert got == [("domains[1]", "delete", "b.example", None, True),
                   ("limits.rate", "update", 10, 20, False),
                   ("preview", "add", None, True, False)]


def test_long_values_are_cut_and_secrets_masked():
    assert pv.shown("x" * 500) == "x" * (pv.VALUE_LIMIT - 1) + "…"
    assert pv.shown({"a": SECRET, "b": ["y" * 200]}) == {"a": "[secret]", "b": ["y" * (pv.VALUE_LIMIT - 1) + "…"]}


@pytest.mark.parametrize("type_, name, kind", [
    ("docker:index/network:Network", "acme-network", "network"),
    ("docker:index/container:Container", "acme-tagging", "container"),
    ("pulumi:providers:docker", "acme-docker", "provider"),
    ("pulumi-python:dynamic:Resource", "acme-network", "network"),
    ("pulumi-python:dynamic:Resource", "acme-preview", "container"),
    ("pulumi-python:dynamic:Resource", "acme-luks-volume", "volume"),
    ("pulumi-python:dynamic:Resource", "acme-nginx-vhost", "nginx"),
    ("pulumi-python:dynamic:Resource", "eu1-firewall-baseline", "firewall"),
    ("pulumi-python:dynamic:Resource", "eu1-timer-dn-backup-platform", "timer"),
    ("pulumi-python:dynamic:Resource", "acme-backup-timer", "timer"),
    ("pulumi-python:dynamic/dn:HostDirectories", "eu1-dirs", "directory"),
    ("pulumi-python:dynamic:Resource", "something-else", "other"),
])
def test_kinds(type_, name, kind):
    assert pv.kind_of(type_, name) == kind


def test_resource_names_read_back_as_their_kind():
    for suffix, kind in pv.NAME_SUFFIXES.items():
        assert pv.kind_of("pulumi-python:dynamic:Resource", pv.resource_name("acme", suffix)) == kind
    assert pv.resource_name("eu1", "timer", "dn-health") == "eu1-timer-dn-health"
    with pytest.raises(ValueError):
        pv.resource_name("acme", "vhost")


def _step(kind, op, *changes, name="x"):
    s = pv.Step("st", op, f"urn::{name}", "pulumi-python:dynamic:Resource", name, kind,
                changes=[pv.Change(p, h, o, n) for p, h, o, n in changes])
    s.flags = pv.flags_of(s)
    return s


def test_flags_follow_the_operation_and_the_changed_paths():
    assert _step("container", "create", ("ports[0].external", "add", None, 8080)).flags == ["public port"]
    assert _step("container", "create", ("image", "add", None, "x")).flags == []
    assert _step("nginx", "update", ("host.hsts_max_age", "update", 63072000, 31536000)).flags == ["TLS/HSTS change"]
    assert _step("nginx", "create", ("tenant.limits.rate_per_ip", "add", None, 10)).flags == []
    assert _step("timer", "update", ("tenant.backup_schedule", "update", "a", "b"),
                 name="acme-backup-timer").flags == ["backup schedule change"]
    assert _step("timer", "update", ("schedules.drill", "update", "a", "b"),
                 name="eu1-timer-dn-drill").flags == ["schedule change"]
    assert _step("firewall", "update", ("host.public_ports[2]", "add", None, 8443)).flags == [
        "firewall change", "public port", "host access change"]
    assert _step("volume", "replace").flags == ["volume replacement"]
    assert _step("network", "delete").flags == ["network change", "network deletion"]
    assert _step("volume", "same").flags == []
