"""The host-resource dynamic providers, called directly (no engine) against the sandbox EU host:
check, diff, create, update, read (drift) and delete of each; the engine-level runs are in the
stack tests. The providers must pickle without state (the engine ships them with dill).
"""
from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import dill
import pytest

from dn import ssh
from dn.host import luks
from dn.host import nginx as hn
from dn.models import HostBaseline, host_view_data
from dn.render import nginx as rn
from dn.render.iptables import parse_save
from stacks.programs import ssh_target_data
from stacks.providers.firewall import FirewallBaselineProvider, TenantFirewallProvider
from stacks.providers.luks import LuksVolumeProvider, encode_key
from stacks.providers.nginx import NginxBaseProvider, NginxVhostProvider
from stacks.providers.timers import SystemdTimerProvider, host_units
from tests.integration.test_nginx_apply import Tenants, https, tenant, wait_until

PROVIDERS = (NginxBaseProvider, NginxVhostProvider, FirewallBaselineProvider, TenantFirewallProvider,
             LuksVolumeProvider, SystemdTimerProvider)
DN_BIN = str(Path(sys.executable).parent / "dn")


@pytest.fixture(autouse=True)
def current_host(monkeypatch):
    """What dn's engine gives the providers: the host's SSH target as the configuration has it
    (read and delete never connect with the one recorded in their state)."""
    from stacks.providers.common import host_env
    from tests.fixtures.sandbox import TEST_DATA, sandbox_settings

    settings = sandbox_settings(TEST_DATA)
    for k, v in host_env(settings.default_host, ssh_target_data(settings.host())).items():
        monkeypatch.setenv(k, v)


@pytest.mark.parametrize("cls", PROVIDERS)
def test_providers_hold_no_state_and_pickle_by_reference(cls):
    p = cls()
    assert vars(p) == {}
    again = dill.loads(dill.dumps(p))
    assert type(again).__module__ == cls.__module__ and type(again).__name__ == cls.__name__


def props_for(sandbox, t=None, **extra) -> dict:
    """Provider inputs for the sandbox host (``sandbox``: the fixture, or anything with .settings)."""
    settings = sandbox.settings
    h = HostBaseline.from_settings(settings, dn_bin=DN_BIN)
    out = {"ssh": ssh_target_data(settings.host()), "host": h.model_dump(mode="json"), **extra}
    if t is not None:
        out["tenant"] = host_view_data(t)
    return out


def test_check_names_the_input_and_the_rule():
    from types import SimpleNamespace

    from tests.fixtures.sandbox import TEST_DATA, sandbox_settings

    sandbox = SimpleNamespace(settings=sandbox_settings(TEST_DATA))  # settings only: check() connects nowhere
    t = tenant("pva", "10.210.50.0/28")
    good = props_for(sandbox, t)
    assert NginxVhostProvider().check({}, good).failures == []
    bad = {**good, "tenant": {**good["tenant"], "slug": "Bad Slug"}}
    (f,) = NginxVhostProvider().check({}, bad).failures
    assert f.property == "tenant" and "slug" in f.reason and "lower-case" in f.reason
    (f,) = NginxBaseProvider().check({}, {**good, "ssh": {"address": "10.231.1.2"}}).failures
    assert f.property == "ssh" and "key_path" in f.reason
    (f,) = TenantFirewallProvider().check({}, {**good, "other_bridges": ["-j ACCEPT"]}).failures
    assert f.property == "other_bridges" or "bridges" in f.reason
    secret = base64.b64encode(b"not a key of the right size").decode()
    (f,) = LuksVolumeProvider().check({}, {**good, "key": secret}).failures
    assert f.property == "key" and secret not in f.reason and "64 bytes" in f.reason
    (f,) = SystemdTimerProvider().check({}, {**good, "unit": "dn-nope"}).failures
    assert f.property == "unit" and "dn-health" in f.reason


# --------------------------------------------------------------------------- nginx


@pytest.mark.sandbox
def test_nginx_providers_create_diff_update_read_delete(sandbox):
    t = tenant("pva", "10.210.50.0/28")
    tenants = Tenants(sandbox, HostBaseline.from_settings(sandbox.settings))
    try:
        tenants.add(t, cert_names=[*t.domains, "api.pva.example"], preview=False)
        base = props_for(sandbox)
        NginxBaseProvider().create(base)  # in place already, or put there now
        p = NginxVhostProvider()
        props = props_for(sandbox, t)
        created = p.create(props)
        outs = created.outs
        assert created.id == "sandbox-eu1:nginx-vhost:pva"
        assert outs["tenant"] == props["tenant"] and outs["digest"] == hn.vhost_unit(tenants.host, t).digest
        wait_until(lambda: https(t.domains[0], "/healthz", ctx=tenants.ctx(t)).status == 200, what="pva served")

        assert p.diff(created.id, outs, props).changes is False
        wider = props_for(sandbox, tenant("pva", t.subnet, domains=[*t.domains, "api.pva.example"]))
        d = p.diff(created.id, outs, wider)
        assert d.changes is True and d.replaces == []
        renamed = props_for(sandbox, tenant("pvb", t.subnet))
        assert p.diff(created.id, outs, renamed).replaces == ["tenant"]
        assert p.diff(created.id, outs, {**props, "ssh": {**props["ssh"], "connect_timeout": 5}}).changes is False

        outs = p.update(created.id, outs, wider).outs
        assert https("api.pva.example", "/healthz", ctx=tenants.ctx(t)).status == 200
        assert p.read(created.id, outs).outs["digest"] == outs["digest"]  # refresh: in place

        # drift: the file edited on the host; the refresh shows it, the next update repairs it
        path = rn.vhost_path(tenants.host, t)
        with ssh.connect(sandbox.host) as s:
            s.install_file(path, s.read_file(path) + b"# edited by hand\n", keep_previous=False)
        drifted = p.read(created.id, outs).outs
        assert drifted["digest"] != outs["digest"] and p.diff(created.id, drifted, wider).changes is True
        outs = p.update(created.id, drifted, wider).outs
        assert p.read(created.id, outs).outs["digest"] == outs["digest"]

        p.delete(created.id, outs)
        assert p.read(created.id, outs).id is None  # gone: a refresh drops it
    finally:
        with ssh.connect(sandbox.host) as s:
            hn.remove_vhost(s, tenants.host, t)
        tenants.cleanup()


# --------------------------------------------------------------------------- firewall


@pytest.mark.sandbox
def test_firewall_providers_create_diff_update_read_delete(sandbox):
    from dn.errors import PolicyViolation
    from dn.host import firewall as fw

    t = tenant("pvf", "10.210.50.16/28")
    base = FirewallBaselineProvider()
    bprops = props_for(sandbox)
    p = TenantFirewallProvider()
    props = props_for(sandbox, t, other_bridges=[])
    try:
        bouts = base.create(bprops).outs  # dn's baseline stays in place afterwards: other sessions use it
        assert bouts["drift"] == [] and base.diff("b", bouts, bprops).changes is False
        assert base.read("b", bouts).outs["digest"] == bouts["digest"]
        created = p.create(props)
        outs = created.outs
        assert created.id == "sandbox-eu1:firewall:pvf" and p.read(created.id, outs).outs["drift"] == []
        assert p.diff(created.id, outs, props).changes is False
        with pytest.raises(PolicyViolation):  # the baseline cannot go while a tenant relies on it
            base.delete("b", bouts)
        more = props_for(sandbox, t, other_bridges=["br-legacy"])
        assert p.diff(created.id, outs, more).changes is True
        outs = p.update(created.id, outs, more).outs
        v4 = parse_save(sandbox.ns_exec(["iptables-save"]).stdout.decode())["filter"]
        assert any("br-legacy" in rule for rule in v4.chain(t.chain_forward))

        sandbox.ns_exec(["iptables", "-w", "-A", t.chain_input, "-p", "tcp", "--dport", "5432", "-j", "ACCEPT"])
        drifted = p.read(created.id, outs).outs
        assert drifted["drift"] and drifted["digest"].startswith("drift:")
        assert p.diff(created.id, drifted, more).changes is True
        outs = p.update(created.id, drifted, more).outs
        assert p.read(created.id, outs).outs["drift"] == []

        p.delete(created.id, outs)
        assert p.read(created.id, outs).id is None
    finally:
        with ssh.connect(sandbox.host) as s:
            fw.remove_tenant(s, HostBaseline.from_settings(sandbox.settings), t)


# --------------------------------------------------------------------------- LUKS


@pytest.mark.sandbox
def test_luks_provider_keeps_the_key_out_of_outputs(sandbox):
    from dn.config import PlanConfig
    from dn.models import parse_tenant
    from dn.sandbox import IMAGE

    plans = {"small": PlanConfig(volume_mb=32), "bigger": PlanConfig(volume_mb=40)}

    def vt(slug="pvl", plan="small"):
        return parse_tenant({"slug": slug, "domains": [f"{slug}.example"], "image": IMAGE, "subnet": "10.210.50.32/28",
                             "plan": plan}, plans=plans, host_view=True)

    key = luks.new_key()
    text = encode_key(key)
    props = props_for(sandbox, vt(), key=text)
    p = LuksVolumeProvider()
    assert p.check({}, props).failures == []
    image = luks.volume_spec(HostBaseline.from_settings(sandbox.settings), vt()).image
    created = None
    try:
        created = p.create(props)
        outs = created.outs
        dumped = json.dumps(outs)
        assert "key" not in outs and text not in dumped and key.hex() not in dumped
        assert outs["key_fingerprint"] == luks.key_fingerprint(key)
        assert outs["header"]["cipher"] == "aes-xts-plain64" and outs["header"]["key_bits"] == 512
        assert outs["spec"]["image"] == image == created.id
        assert p.diff(created.id, outs, props).changes is False

        other = encode_key(luks.new_key())
        assert p.diff(created.id, outs, {**props, "key": other}).changes is True
        with pytest.raises(luks.InvalidInput) as ei:  # a key that does not open the volume is refused
            p.update(created.id, outs, {**props, "key": other})
        assert ei.value.field == "key" and other not in str(ei.value)

        bigger = props_for(sandbox, vt(plan="bigger"), key=text)
        d = p.diff(created.id, outs, bigger)
        assert d.changes is True and d.replaces == []
        outs = p.update(created.id, outs, bigger).outs
        assert outs["spec"]["size_mb"] == 40 and p.read(created.id, outs).outs["spec"]["size_mb"] == 40
        read = p.read(created.id, outs).outs
        assert read["header"]["keyslots"][0]["pbkdf"] == "argon2id" and text not in json.dumps(read)
        assert p.diff(created.id, read, bigger).changes is False

        moved = props_for(sandbox, vt(slug="pvm", plan="bigger"), key=text)
        d = p.diff(created.id, outs, moved)
        assert d.replaces == ["image"] and d.delete_before_replace is True

        p.delete(created.id, outs)
        assert p.read(created.id, outs).id is None
    finally:
        if created is not None:
            with ssh.connect(sandbox.host) as s:
                luks.remove(s, luks.volume_spec(HostBaseline.from_settings(sandbox.settings), vt()))


# --------------------------------------------------------------------------- timers


@pytest.mark.sandbox
def test_timer_provider_create_diff_update_read_delete(sandbox):
    t = tenant("pvt", "10.210.50.48/28")
    p = SystemdTimerProvider()
    props = props_for(sandbox, t, unit="dn-backup-pvt")
    created = p.create(props)
    try:
        outs = created.outs
        assert created.id == "sandbox-eu1:dn-backup-pvt"
        assert any("not enabled" in n for n in outs["notes"])
        assert p.diff(created.id, outs, props).changes is False
        later = props_for(sandbox, tenant("pvt", t.subnet, backup_schedule="*-*-* 05:45:00"), unit="dn-backup-pvt")
        assert p.diff(created.id, outs, later).changes is True
        outs = p.update(created.id, outs, later).outs
        assert p.read(created.id, outs).outs["digest"] == outs["digest"]
        timer = HostBaseline.from_settings(sandbox.settings).path("/etc/systemd/system/dn-backup-pvt.timer")
        assert b"OnCalendar=*-*-* 05:45:00" in Path(timer).read_bytes()
        Path(timer).write_bytes(Path(timer).read_bytes().replace(b"Persistent=true", b"Persistent=false"))
        drifted = p.read(created.id, outs).outs
        assert drifted["digest"] != outs["digest"] and p.diff(created.id, drifted, later).changes is True
        outs = p.update(created.id, drifted, later).outs
        assert b"Persistent=true" in Path(timer).read_bytes()
        # the host's own jobs, one resource each
        h = HostBaseline.from_settings(sandbox.settings)
        units = host_units(h, sandbox.settings.schedules)
        assert units == ["dn-backup-platform", "dn-health", "dn-verify", "dn-drill", "dn-retention"]
        assert p.diff(created.id, outs, {**later, "unit": "dn-health", "tenant": None}).replaces == ["unit"]
    finally:
        p.delete(created.id, created.outs)
    assert p.read(created.id, created.outs).id is None


# --------------------------------------------------------------------------- through the real engine


def _cli_missing() -> str | None:
    from tests.integration.test_engine import _cli_missing_reason

    return _cli_missing_reason()


@pytest.mark.sandbox
@pytest.mark.engine
def test_the_engine_keeps_the_luks_key_encrypted_in_state(sandbox, tmp_path):
    """up, preview, refresh and destroy of a LuksVolume through the real Pulumi CLI: the key is
    ciphertext in every state file the backend wrote, and nothing shows a change that is none."""
    import os

    import pulumi

    from dn import engine
    from dn.config import PlanConfig, load_settings
    from dn.models import parse_tenant
    from dn.sandbox import IMAGE
    from stacks.programs import REPO

    reason = _cli_missing()
    if reason:
        pytest.skip(reason)
    home = tmp_path / "dn"
    (home / "sandbox").mkdir(parents=True)
    (home / "sandbox" / "passphrase").write_text("provider test passphrase\n")
    (home / "sandbox" / "passphrase").chmod(0o600)
    env = dict(os.environ, DN_HOME=str(home), XDG_CONFIG_HOME=str(tmp_path / "config"))
    settings = load_settings(environ=env)
    key = luks.new_key()
    text = encode_key(key)
    t = parse_tenant({"slug": "pve", "domains": ["pve.example"], "image": IMAGE, "subnet": "10.210.50.64/28",
                      "plan": "small"}, plans={"small": PlanConfig(volume_mb=32)}, host_view=True)
    props = props_for(sandbox, t)

    def program() -> None:
        from stacks.providers.luks import LuksVolume

        v = LuksVolume("vol", ssh=props["ssh"], host=props["host"], tenant=props["tenant"],
                       key=pulumi.Output.secret(text))
        pulumi.export("fingerprint", v.key_fingerprint)
        pulumi.export("cipher", v.header.apply(lambda h: h["cipher"]))

    st = engine.stack(settings, "luks-secret", program, extra_env={"PYTHONPATH": str(REPO)}, environ=env)
    try:
        up = engine.up(st)
        assert up.changes.get("create") == 2 and up.outputs["cipher"] == "aes-xts-plain64"
        assert up.outputs["fingerprint"] == luks.key_fingerprint(key)
        assert engine.preview(st).changes == {"same": 2}
        assert engine.refresh(st).changes == {"same": 2}
    finally:
        engine.destroy(st)
    written = [Path(d) / f for d, _, fs in os.walk(home / "state") for f in fs]
    assert written
    blob = b"".join(p.read_bytes() for p in written)
    assert text.encode() not in blob and key.hex().encode() not in blob and key not in blob
    assert b'"key"' in blob and b"ciphertext" in blob  # the input is there, encrypted
    with ssh.connect(sandbox.host) as s:
        assert not luks.read(s, luks.volume_spec(HostBaseline.from_settings(sandbox.settings), t)).exists
