"""Configuration: file, environment overrides, strict validation naming file, key and rule."""
from pathlib import Path

import pytest

from dn.config import SANDBOX_HOST, load_settings
from dn.errors import ConfigError, ExitCode

GOOD = """
default_host = "eu1"
[hosts.eu1]
address = "203.0.113.10"
key_path = "/root/.ssh/dn_ed25519"
host_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGj7l4Z6Yx1Q2Z3x4c5v6b7n8m9a0s1d2f3g4h5j6k7l"
admin_sources = ["198.51.100.7/32"]
[database]
dsn = "postgresql://dn@db.internal:5432/dn"
[plans.pro]
rate_per_ip = 50
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def test_embedded_default_is_the_sandbox(tmp_path):
    s = load_settings(None, {"DN_HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "none")})
    assert s.default_host == SANDBOX_HOST
    assert s.host().address == "10.231.1.2"
    assert s.backend_url == f"file://{tmp_path / 'state'}"
    assert "embedded default" in s.source


def test_file_and_env_override(tmp_path):
    p = write(tmp_path, GOOD)
    s = load_settings(p, {"DN__HOSTS__EU1__PORT": "2222", "DN__PLANS__PRO__CPUS": "2.5", "DN_HOME": str(tmp_path)})
    assert s.host("eu1").port == 2222
    assert s.plan("pro").rate_per_ip == 50
    assert s.plan("pro").cpus == 2.5
    assert s.source == str(p)


@pytest.mark.parametrize(
    "text, key, rule",
    [
        (GOOD + "\n[surprise]\nx = 1\n", "surprise", "unknown key"),
        (GOOD.replace('address = "203.0.113.10"', 'address = "bad host!"'), "hosts.eu1.address", "IP address or a lower-case DNS hostname"),
        (GOOD.replace('host_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGj7l4Z6Yx1Q2Z3x4c5v6b7n8m9a0s1d2f3g4h5j6k7l"', ""), "hosts.eu1", "never accepts an unknown host key"),
        (GOOD.replace("dn@db.internal", "dn:hunter2@db.internal"), "database.dsn", "must not contain a password"),
        (GOOD.replace('"198.51.100.7/32"', '"not-a-cidr"'), "hosts.eu1.admin_sources", "not a CIDR"),
        (GOOD.replace("rate_per_ip = 50", "rate_per_ip = 0"), "plans.pro.rate_per_ip", "greater than or equal to 1"),
        (GOOD.replace('default_host = "eu1"', 'default_host = "eu9"'), "default_host", "not one of hosts"),
        (GOOD + '\n[retention]\naccounting_years = 3\n', "retention.accounting_years", "greater than or equal to 5"),
        (GOOD.replace('admin_sources =', 'dn_bin = "bin/dn"\nadmin_sources ='), "hosts.eu1.dn_bin", "must be an absolute path"),
        (GOOD.replace('admin_sources =', 'dn_config = "/etc/dn/../x"\nadmin_sources ='), "hosts.eu1.dn_config", "without '..'"),
    ],
)
def test_invalid_config_names_file_key_and_rule(tmp_path, text, key, rule):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_settings(p, {"DN_HOME": str(tmp_path)})
    msg = str(ei.value)
    assert str(p) in msg and key in msg and rule in msg
    assert ei.value.exit_code == ExitCode.INVALID
    assert "hunter2" not in msg


def test_env_override_unknown_key_is_an_error(tmp_path):
    p = write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match="hosts.eu1.prot: unknown key"):
        load_settings(p, {"DN__HOSTS__EU1__PROT": "22", "DN_HOME": str(tmp_path)})


def test_broken_toml_and_missing_explicit_file(tmp_path):
    p = write(tmp_path, "hosts = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(p, {})
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml", {})


def test_default_locations_come_from_the_given_environment(tmp_path):
    cfg_home = tmp_path / "xdg"
    (cfg_home / "dn").mkdir(parents=True)
    (cfg_home / "dn" / "config.toml").write_text(GOOD)
    s = load_settings(None, {"XDG_CONFIG_HOME": str(cfg_home), "XDG_DATA_HOME": str(tmp_path / "data")})
    assert s.source == str(cfg_home / "dn" / "config.toml")
    assert s.data_dir == tmp_path / "data" / "dn"


def test_a_hosts_dn_install_reaches_its_timers(tmp_path):
    """Where dn lives on the host, its config and data dir are per host: the timers run them."""
    from dn.models import HostBaseline
    from dn.render import systemd as rs

    p = write(tmp_path, GOOD.replace('admin_sources =', 'dn_bin = "/opt/dn/bin/dn"\ndn_config = "/etc/dn/config.toml"\n'
                                                       'dn_data_dir = "/srv/dn"\nadmin_sources ='))
    s = load_settings(p, {"DN_HOME": str(tmp_path)})
    host = HostBaseline.from_settings(s)
    assert (host.dn_bin, host.dn_config, host.data_dir) == ("/opt/dn/bin/dn", "/etc/dn/config.toml", "/srv/dn")
    files = {path: text for job in rs.jobs(host, [], s.schedules) for path, text in rs.render_job(job, host).items()}
    services = [t for path, t in files.items() if path.endswith(".service")]
    assert services and all("ExecStart=/opt/dn/bin/dn " in t and "DN_CONFIG=/etc/dn/config.toml" in t for t in services)
    default = HostBaseline.from_settings(load_settings(write(tmp_path, GOOD), {"DN_HOME": str(tmp_path)}))
    assert default.dn_bin == "/usr/local/bin/dn" and default.data_dir == "/var/lib/dn"
