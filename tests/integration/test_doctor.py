"""`dn doctor` on the sandbox: every required check passes; a broken prerequisite fails with its fix."""
from __future__ import annotations

import pytest

from tests.stacks import e2e

pytestmark = [pytest.mark.sandbox, pytest.mark.postgres,
              pytest.mark.skipif(e2e.engine_missing() is not None, reason=e2e.engine_missing() or "")]


@pytest.fixture
def env(sandbox, dn_settings_data, tmp_path):
    return e2e.make_env(sandbox, dn_settings_data, tmp_path)


def by_name(checks: list[dict]) -> dict[str, dict]:
    return {c["name"]: c for c in checks}


def test_doctor_passes_on_the_sandbox(env):
    code, checks, err = env.dn_json("doctor")
    failed = [c for c in checks if c["required"] and not c["ok"]]
    assert code == 0 and not failed, (failed, err)
    names = by_name(checks)
    for name in ("configuration", "secrets passphrase", "python packages", "pulumi", "ssh sandbox-eu1",
                 "sandbox-eu1: nginx", "sandbox-eu1: iptables", "sandbox-eu1: dockerd", "sandbox-eu1: cryptsetup",
                 "backup region", "postgresql"):
        assert names[name]["ok"], names[name]
    # device-mapper is reported either way, and never fails the run
    assert names["sandbox-eu1: device-mapper"]["required"] is False


def test_doctor_names_what_is_broken_and_the_fix(env, tmp_path):
    (tmp_path / "known_hosts").write_text("")  # a known_hosts without the host's key
    broken = env.write_config(tmp_path / "broken.toml", **{
        "secrets": {"passphrase_file": str(tmp_path / "absent-passphrase")},
        "hosts.sandbox-eu1.known_hosts": str(tmp_path / "known_hosts"),
    })
    code, checks, _ = env.dn_json("doctor", config=broken)
    names = by_name(checks)
    assert code != 0
    assert not names["secrets passphrase"]["ok"] and "absent-passphrase" in names["secrets passphrase"]["detail"]
    assert names["secrets passphrase"]["fix"]
    ssh = names["ssh sandbox-eu1"]
    assert not ssh["ok"] and "SHA256:" in ssh["detail"], ssh  # the fingerprint seen, never accepted
    assert names["postgresql"]["ok"]  # the rest is still checked
