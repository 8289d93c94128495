"""Which SSH settings the host providers connect with, and how a provider's host-key refusal
reaches dn: never the pin recorded in the state for ``read``/``delete``, always the current
configuration's (``DN_PROVIDER_HOST``), and a refusal is exit 3 naming the fingerprint, not a
"Traceback" and exit 1. No host is contacted here: where a session would be opened, the test
stops at the target dn would connect to."""
from __future__ import annotations

import json

import pytest

from dn import engine
from dn.errors import ExitCode, HostKeyError, InvalidInput, OperationFailed, Unreachable
from stacks.providers import common as c

OLD_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
NEW_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHm1jXhWY5R0RSRJ8MRwNN8wlxXKvXLbUCcZc1pNqZ2a"
STORED = {"address": "10.231.1.2", "port": 22, "user": "root", "key_path": "/old/id_ed25519", "host_key": OLD_KEY}
CURRENT = {"address": "10.231.1.2", "port": 22, "user": "root", "key_path": "/new/id_ed25519", "host_key": NEW_KEY}


@pytest.fixture
def connects(monkeypatch):
    """The targets dn.ssh.connect was asked for (nothing is connected)."""
    from dn import ssh

    seen = []

    def fake_connect(target, **_kw):
        seen.append(target)
        raise Unreachable("stopped before connecting (test)")

    monkeypatch.setattr(ssh, "connect", fake_connect)
    return seen


def test_read_and_delete_connect_with_the_current_pin_never_the_stored_one(monkeypatch, connects):
    monkeypatch.setenv(c.HOST_ENV, json.dumps({"name": "eu1", "ssh": CURRENT}))
    state = {"ssh": STORED, "host": {"name": "eu1"}}
    with pytest.raises(Unreachable):
        c.state_session(state)
    with pytest.raises(Unreachable):
        c.session(state)  # create/update too: the run's configuration wins over the program's copy
    assert [t.host_key for t in connects] == [NEW_KEY, NEW_KEY]
    assert [str(t.key_path) for t in connects] == ["/new/id_ed25519"] * 2


def test_without_the_current_configuration_state_is_never_trusted(monkeypatch, connects):
    monkeypatch.delenv(c.HOST_ENV, raising=False)
    with pytest.raises(OperationFailed) as e:
        c.state_session({"ssh": STORED})
    assert c.HOST_ENV in str(e.value) and "dn refresh" in str(e.value)
    assert connects == []
    # create/update get the program's own inputs, which are the current configuration
    with pytest.raises(Unreachable):
        c.session({"ssh": CURRENT})
    assert [t.host_key for t in connects] == [NEW_KEY]


def test_a_resource_of_another_host_is_refused(monkeypatch, connects):
    monkeypatch.setenv(c.HOST_ENV, json.dumps({"name": "eu1", "ssh": CURRENT}))
    with pytest.raises(InvalidInput) as e:
        c.state_session({"ssh": STORED, "host": {"name": "eu2"}})
    assert e.value.field == "host" and "'eu2'" in str(e.value) and "'eu1'" in str(e.value)
    monkeypatch.setenv(c.HOST_ENV, "not json")
    with pytest.raises(Exception) as e:
        c.state_session({"ssh": STORED})
    assert c.HOST_ENV in str(e.value)
    assert connects == []


def test_host_env_round_trips_the_target():
    from dn.config import HostConfig
    from stacks.programs import ssh_target_data

    h = HostConfig.model_validate({**CURRENT, "known_hosts": "/etc/dn/known_hosts", "connect_timeout": 3})
    env = c.host_env("eu1", ssh_target_data(h))
    assert set(env) == {c.HOST_ENV}
    data = json.loads(env[c.HOST_ENV])
    assert data["name"] == "eu1" and data["ssh"]["known_hosts"] == "/etc/dn/known_hosts"
    assert "BEGIN" not in env[c.HOST_ENV]  # paths and public keys only


# The shape of a refresh whose dynamic provider refused the host key (engine diagnostics with the
# provider's traceback; the exception's line is the last of it).
REFRESH_OUTPUT = """Refreshing (t1):

    pulumi-python:dynamic:Resource t1-luks-volume  error: Preview failed: Traceback (most recent call last):
Diagnostics:
  pulumi-python:dynamic:Resource (t1-luks-volume):
    error: Preview failed: Traceback (most recent call last):
      File "/work/main/.venv/lib/python3.11/site-packages/pulumi/dynamic/__main__.py", line 84, in wrapper
        return fn(self, request, context)
      File "/work/main/dn/ssh.py", line 420, in connect
        check_host_key(PublicKey(server_key.get_name(), server_key.asbytes()), pinned, where)
    dn.errors.HostKeyError: root@10.231.1.2 presented a REVOKED host key ssh-ed25519 SHA256:abcDEF; refusing to connect (fix: verify the host out of band and pin its new key in /etc/dn/known_hosts)

Resources:
    1 errored
"""


def test_a_provider_host_key_refusal_is_exit_3_with_the_fingerprint():
    refused = engine.provider_refusal(REFRESH_OUTPUT)
    assert isinstance(refused, HostKeyError) and refused.exit_code == ExitCode.UNREACHABLE
    assert "SHA256:abcDEF" in refused.message and "fix:" in refused.message and "Traceback" not in refused.message
    assert refused.runbook.startswith("host-key-compromise")
    unreachable = engine.provider_refusal("    dn.errors.Unreachable: cannot reach root@h: connection refused\n")
    assert type(unreachable) is Unreachable and unreachable.message.endswith("connection refused")
    assert engine.provider_refusal("    dn.errors.InvalidInput: network: must be a network name\n") is None


def test_the_engine_maps_the_refusal(monkeypatch):
    from pulumi.automation import errors as auto_errors
    from pulumi.automation._cmd import CommandResult

    err = auto_errors.CommandError(CommandResult(stdout=REFRESH_OUTPUT, stderr="", code=255))
    with pytest.raises(HostKeyError) as e, engine._mapped("refresh", "t1", {}):
        raise err
    assert str(e.value).startswith("stack t1: refresh: root@10.231.1.2 presented a REVOKED host key")
    assert e.value.exit_code == ExitCode.UNREACHABLE and "Traceback" not in str(e.value)


def test_host_key_messages_carry_the_fix():
    """The message is all that crosses back from a provider process: it names the fingerprint
    the host presented and what to do."""
    from dn import ssh

    old, new = ssh.parse_public_key(OLD_KEY), ssh.parse_public_key(NEW_KEY)
    cases = [ssh.PinnedKeys((old,), (), ("/kh",)), ssh.PinnedKeys((), (), ("/kh",)),
             ssh.PinnedKeys((new,), (new,), ("/kh",))]
    for pins in cases:
        with pytest.raises(HostKeyError) as e:
            ssh.check_host_key(new, pins, "root@h")
        assert new.fingerprint in e.value.message and "(fix: " in e.value.message and "/kh" in e.value.message
