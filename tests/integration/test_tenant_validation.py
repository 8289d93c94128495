"""`dn tenant create/update` check their input before any I/O: with the platform database
unreachable (a DSN to a closed loopback port), bad input still exits 2 and names every invalid
field at once; good input then fails on the database (exit 3), so the checks run first and
nothing else was skipped.

The `dn` command runs as a subprocess with a configuration of its own: no database, no host
and no sandbox are touched.
"""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dn.errors import ExitCode
from tests.fixtures.postgres import _ssh_keypair, to_toml

REPO = Path(__file__).resolve().parents[2]
CONFIG = "c2d0bS1jb250YWluZXItY29uZmlnLXNlY3JldC12YWx1ZQ=="  # never in argv or output
BAD_CONFIG = "not base64 at all!! " + CONFIG


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dn(tmp_path):
    data_dir = tmp_path / "dn"
    data_dir.mkdir(mode=0o700)
    key = data_dir / "id_ed25519"
    _ssh_keypair(key)
    passfile = tmp_path / "pgpass"
    passfile.write_text("")
    passfile.chmod(0o600)
    port = _closed_port()
    cfg = tmp_path / "dn.toml"
    cfg.write_text(to_toml({
        "data_dir": str(data_dir),
        "default_host": "eu1",
        "hosts": {"eu1": {"address": "127.0.0.1", "user": "root", "key_path": str(key),
                          "host_key": _ssh_keypair(None), "prefix": str(tmp_path / "host"),
                          "admin_sources": ["192.0.2.0/24"]}},
        "database": {"dsn": f"postgresql://dn@127.0.0.1:{port}/dn", "passfile": str(passfile)},
    }) + "\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DN_CONFIG": str(cfg), "DN_HOME": str(data_dir)}

    def run(*argv: str, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "from cli.main import run; run()", *argv], env=env, cwd=REPO,
                              input=input, capture_output=True, text=True, timeout=120)
    # the database really is unreachable for this configuration
    r = run("tenant", "list")
    assert r.returncode == ExitCode.UNREACHABLE and "cannot connect to PostgreSQL" in r.stderr, r.stderr
    return run


def test_bad_slug_exits_2_with_the_database_unreachable(dn):
    r = dn("tenant", "create", "Bad;Slug", "--domain", "gtm.acme.example", "--container-config-stdin", input=CONFIG)
    assert r.returncode == ExitCode.INVALID, r.stderr
    assert "error: slug: must be 3-32 characters" in r.stderr, r.stderr
    assert "PostgreSQL" not in r.stderr and CONFIG not in r.stdout + r.stderr


def test_every_invalid_field_is_named_at_once(dn):
    r = dn("tenant", "create", "Bad;Slug", "--domain", "not a domain", "--plan", "gold",
           "--image", "docker.io/library/nginx:1", "--backup-schedule", "*-*-* 25:00", "--host", "nowhere",
           "--container-config-stdin", input=BAD_CONFIG)
    assert r.returncode == ExitCode.INVALID, r.stderr
    for field, rule in [("slug", "must be 3-32 characters"), ("domains[0]", "whitespace"),
                        ("plan", "unknown plan 'gold'"), ("image", "is not allowed"),
                        ("container_config", "must be base64 text"), ("backup_schedule", "hour"),
                        ("host", "unknown host 'nowhere'")]:
        assert f"{field}: " in r.stderr and rule in r.stderr, (field, r.stderr)
    assert r.stderr.index("slug:") < r.stderr.index("domains[0]:") < r.stderr.index("plan:")
    assert BAD_CONFIG not in r.stdout + r.stderr and CONFIG not in r.stdout + r.stderr


def test_missing_or_unreadable_container_config_is_named_with_the_slug(dn, tmp_path):
    r = dn("tenant", "create", "Bad;Slug", "--domain", "gtm.acme.example")
    assert r.returncode == ExitCode.INVALID, r.stderr
    assert "error: slug: must be 3-32 characters" in r.stderr and "container_config: is required" in r.stderr, r.stderr
    r = dn("tenant", "create", "Bad;Slug", "--domain", "gtm.acme.example",
           "--container-config-file", str(tmp_path / "no-such-file"))
    assert r.returncode == ExitCode.INVALID, r.stderr
    assert "error: slug: " in r.stderr and "container_config: cannot read" in r.stderr, r.stderr


def test_update_checks_its_fields_before_the_registry(dn):
    r = dn("tenant", "update", "Bad;Slug", "--plan", "gold", "--status", "deleted", "--domain", "a b")
    assert r.returncode == ExitCode.INVALID, r.stderr
    for field in ("slug", "domains[0]", "plan", "status"):
        assert f"{field}: " in r.stderr, (field, r.stderr)
    assert "PostgreSQL" not in r.stderr


def test_valid_input_then_meets_the_unreachable_database(dn):
    r = dn("tenant", "create", "acme", "--domain", "gtm.acme.example", "--container-config-stdin", input=CONFIG)
    assert r.returncode == ExitCode.UNREACHABLE and "cannot connect to PostgreSQL" in r.stderr, r.stderr
    r = dn("tenant", "update", "acme", "--plan", "standard")
    assert r.returncode == ExitCode.UNREACHABLE and "cannot connect to PostgreSQL" in r.stderr, r.stderr
