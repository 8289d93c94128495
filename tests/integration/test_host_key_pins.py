"""Host-key pins against the sandbox EU host's real sshd: the current configuration's pin always
wins, and every command that acts on or reports about a host verifies it first.

- A resource created while the host's key was pinned keeps that pin in its Pulumi state. After
  the operator re-pins (here: a new known_hosts file with the old key ``@revoked``), ``read``
  (refresh) and ``delete`` (destroy, the LUKS crypto-erase included) must refuse, naming the
  fingerprint, through the providers and through the real engine, and leave the volume alone.
- With a stranger's key pinned for the host (from dn's side that is exactly a host whose key was
  replaced), ``dn refresh`` and ``dn up`` exit 3 naming the fingerprint the host presented and the
  fix, without a Python traceback, and ``dn up`` is audited as failed. (``dn preview`` contacts no
  host and runs in CI without an SSH key: docs/ci-security.md.)

Nothing here changes the sandbox host but the tests' own LUKS image files, removed afterwards.
The host's own sshd key is left alone: the pins are changed on dn's side only.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from dn import engine, ssh
from dn.config import PlanConfig, Settings
from dn.errors import ExitCode, HostKeyError
from dn.host import luks
from dn.models import HostBaseline, host_view_data, parse_tenant
from stacks.programs import REPO, ssh_target_data
from stacks.providers import common
from stacks.providers.luks import LuksVolumeProvider, encode_key

HOST = "sandbox-eu1"
EU1_PUB = Path("/srv/dn-sandbox/eu1/etc/ssh/ssh_host_ed25519_key.pub")


def fingerprint(pub: Path) -> str:
    return subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True).stdout.split()[1]


def stranger(tmp_path: Path) -> Path:
    """A fresh key pair's public half: someone else's host key."""
    key = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "stranger", "-f", str(key)], check=True)
    return key.with_name("stranger.pub")


def revoked_known_hosts(tmp_path: Path) -> Path:
    """The operator's re-pin after a compromise: the host's old key @revoked, a new one pinned."""
    kh = tmp_path / "known_hosts.repinned"
    kh.write_text(f"@revoked 10.231.1.2 {EU1_PUB.read_text().strip()}\n10.231.1.2 {stranger(tmp_path).read_text()}")
    return kh


def volume_tenant(slug: str):
    from dn.sandbox import IMAGE

    return parse_tenant({"slug": slug, "domains": [f"{slug}.example"], "image": IMAGE, "subnet": "10.210.50.96/28",
                         "plan": "small"}, plans={"small": PlanConfig(volume_mb=32)}, host_view=True)


def set_current(monkeypatch, target) -> None:
    """What dn's engine hands the providers of a stack: the current configuration's target."""
    for k, v in common.host_env(HOST, ssh_target_data(target)).items():
        monkeypatch.setenv(k, v)


def volume_exists(sandbox, t) -> bool:
    with ssh.connect(sandbox.host) as s:
        return luks.read(s, luks.volume_spec(HostBaseline.from_settings(sandbox.settings), t)).exists


@pytest.mark.sandbox
def test_read_and_delete_refuse_a_pin_revoked_since_create(sandbox, tmp_path, monkeypatch):
    t = volume_tenant("pkp")
    props = {"ssh": ssh_target_data(sandbox.host), "host": HostBaseline.from_settings(sandbox.settings)
             .model_dump(mode="json"), "tenant": host_view_data(t), "key": encode_key(luks.new_key())}
    p = LuksVolumeProvider()
    set_current(monkeypatch, sandbox.host)
    created = p.create(props)
    try:
        outs = created.outs
        assert outs["ssh"] == props["ssh"]  # the state records the pin of the time
        assert p.read(created.id, outs).id == created.id
        set_current(monkeypatch, sandbox.host.model_copy(update={"known_hosts": revoked_known_hosts(tmp_path)}))
        seen = fingerprint(EU1_PUB)
        with pytest.raises(HostKeyError) as e:
            p.read(created.id, outs)
        assert "REVOKED" in str(e.value) and seen in str(e.value) and e.value.exit_code == ExitCode.UNREACHABLE
        with pytest.raises(HostKeyError):
            p.delete(created.id, outs)  # no crypto-erase over a connection the configuration distrusts
        assert volume_exists(sandbox, t)
    finally:
        set_current(monkeypatch, sandbox.host)
        p.delete(created.id, created.outs)
    assert not volume_exists(sandbox, t)


def _engine_missing() -> str | None:
    from dn import tooling

    prov = tooling.status()
    if not all(t.present for t in prov.tools if t.name in ("pulumi", tooling.DYNAMIC_LAUNCHER)):
        return f"the Pulumi CLI v{tooling.PULUMI_VERSION} is not provisioned (dn setup)"
    return None


@pytest.mark.sandbox
@pytest.mark.engine
def test_refresh_and_destroy_through_the_engine_use_the_current_pin(sandbox, tmp_path):
    """The real engine and dn's provider process: the stack's state holds the pin of its create;
    after the re-pin, refresh and destroy are HostKeyError (exit 3) naming the fingerprint, not
    a traceback, and the volume is still there; with the configuration's pin back, destroy runs."""
    reason = _engine_missing()
    if reason:
        pytest.skip(reason)
    import pulumi

    from dn import tenants
    from stacks.providers.luks import LuksVolume

    home = tmp_path / "dn"
    home.mkdir()
    pf = home / "passphrase"
    pf.write_text("host key pins test passphrase\n")
    pf.chmod(0o600)
    data = sandbox.settings.model_dump(mode="json", exclude_none=True)
    data.update(data_dir=str(home), secrets={"passphrase_file": str(pf)}, state={}, source="test")
    before = Settings.model_validate(data)
    data["hosts"][HOST]["known_hosts"] = str(revoked_known_hosts(tmp_path))
    after = Settings.model_validate(data)
    t = volume_tenant("pke")
    text = encode_key(luks.new_key())
    env = dict(os.environ, DN_HOME=str(home), XDG_CONFIG_HOME=str(tmp_path / "config"))
    env.pop(common.HOST_ENV, None)

    def program(settings: Settings):
        def run() -> None:
            LuksVolume("vol", ssh=ssh_target_data(settings.host()), host=HostBaseline.from_settings(settings)
                       .model_dump(mode="json"), tenant=host_view_data(t), key=pulumi.Output.secret(text))
        return run

    def stack(settings: Settings):
        # tenants' provider environment: dn's modules and the host's target of ``settings``
        extra = tenants._provider_env(settings, HOST)
        assert extra["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)
        return engine.stack(settings, "host-key-pins", program(settings), extra_env=extra, environ=env)

    st = stack(before)
    try:
        assert engine.up(st).changes.get("create") == 2
        assert engine.refresh(st).changes == {"same": 2}
        state = json.dumps([json.loads(p.read_text()) for p in (home / "state").rglob("host-key-pins.json")])
        assert str(sandbox.host.known_hosts) in state  # the pin of the create is in the state
        seen = fingerprint(EU1_PUB)
        repinned = stack(after)
        for op in (engine.refresh, engine.destroy):
            with pytest.raises(HostKeyError) as e:
                op(repinned)
            msg = str(e.value)
            assert "REVOKED" in msg and seen in msg and "fix:" in msg, msg
            assert "Traceback" not in msg and e.value.exit_code == ExitCode.UNREACHABLE
            assert e.value.runbook.startswith("host-key-compromise")
            assert volume_exists(sandbox, t)  # refused before any crypto-erase
    finally:
        engine.destroy(stack(before), remove=True)
    assert not volume_exists(sandbox, t)


@pytest.fixture
def e2e_env(sandbox, dn_settings_data, tmp_path):
    from tests.stacks import e2e

    if e2e.engine_missing():
        pytest.skip(e2e.engine_missing())
    return e2e.make_env(sandbox, dn_settings_data, tmp_path)


@pytest.mark.sandbox
@pytest.mark.postgres
@pytest.mark.engine
def test_commands_verify_the_host_key_first(e2e_env, sandbox, tmp_path):
    """A host whose key is not the pinned one (a stranger's key pinned): refresh (which found no
    stack and said "no drift" without asking the host) and up (which went on to the engine and
    failed with a traceback) exit 3 naming the fingerprint and the fix."""
    from dn import audit

    kh = tmp_path / "known_hosts.stranger"
    kh.write_text(f"10.231.1.2 {stranger(tmp_path).read_text()}")
    config = e2e_env.write_config(tmp_path / "stranger.toml", **{f"hosts.{HOST}.known_hosts": str(kh)})
    seen = fingerprint(EU1_PUB)
    for argv in (["refresh", "--host", HOST], ["up", "--host", HOST]):
        r = e2e_env.dn(*argv, config=config)
        assert r.returncode == ExitCode.UNREACHABLE, (argv, r.returncode, r.stderr)
        assert "CHANGED" in r.stderr and seen in r.stderr and "fix:" in r.stderr, r.stderr
        assert "host-key-compromise" in r.stderr and "Traceback" not in r.stderr
    assert not (Path(e2e_env.settings.data_dir) / "stacks" / f"host--{HOST}").exists()  # no engine run
    ups = [e for e in audit.show(e2e_env.ctx) if e.command == "up"]
    assert [(e.outcome, e.exit_code, e.host) for e in ups] == [("failed", 3, HOST)]


@pytest.mark.sandbox
def test_the_known_hosts_written_for_openssh_keeps_the_revocation(sandbox, tmp_path):
    """pulumi-docker reaches the daemon through OpenSSH with the known_hosts file dn writes: a key
    the configuration pins in one line and revokes in another must be refused there too."""
    from stacks.programs import write_known_hosts

    pub = EU1_PUB.read_text().strip()
    kh = tmp_path / "known_hosts"
    kh.write_text(f"10.231.1.2 {pub}\n@revoked 10.231.1.2 {pub}\n10.231.1.2 {stranger(tmp_path).read_text()}")
    data = sandbox.settings.model_dump(mode="json", exclude_none=True)
    data["data_dir"] = str(tmp_path / "dn")
    data["hosts"][HOST]["known_hosts"] = str(kh)
    written = write_known_hosts(Settings.model_validate(data), HOST)
    r = subprocess.run(["ssh", "-o", f"UserKnownHostsFile={written}", "-o", "StrictHostKeyChecking=yes",
                        "-o", "GlobalKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                        "-o", "ConnectTimeout=10", "-i", str(sandbox.host.key_path), "root@10.231.1.2", "true"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 255 and "REVOKED" in r.stderr.upper(), r.stderr


@pytest.mark.sandbox
def test_verify_shows_the_host_presents_its_pin_and_no_revoked_key(sandbox, tmp_path, capfd):
    from dn.verify.core import Status
    from dn.verify.hostkey import check_host_key
    from dn.verify.probe import Probe

    seen = fingerprint(EU1_PUB)
    with Probe(sandbox.settings) as probe:
        status, ev = check_host_key(probe)
    assert status is Status.PASS, ev
    assert any(line.startswith("ssh-ed25519: ssh-ed25519 " + seen) and line.endswith(": pinned") for line in ev), ev

    data = sandbox.settings.model_dump(mode="json", exclude_none=True)
    data["hosts"][HOST]["known_hosts"] = str(revoked_known_hosts(tmp_path))
    with Probe(Settings.model_validate(data)) as probe:
        status, ev = check_host_key(probe)
    assert status is Status.FAIL
    assert any("still presents the REVOKED key" in line and seen in line for line in ev), ev
    assert any("presents no key pinned" in line for line in ev), ev
    assert "Traceback" not in capfd.readouterr().err  # key types the host lacks are not an error
