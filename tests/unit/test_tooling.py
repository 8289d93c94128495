"""dn.tooling without the network: version parsing, the wrapper go.mod, the order of the CLI's
sources, locking and atomic installs, the launchers and the engine environment.

Provisioning-order tests use small shell scripts that answer ``version`` in place of the real CLI:
the real one takes minutes to build and needs the module proxy (tests/integration/test_engine.py
runs the real one).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dn import tooling
from dn.config import load_settings
from dn.errors import ConfigError

V = tooling.PULUMI_VERSION


@pytest.mark.parametrize(
    "text, expected",
    [
        ("v3.274.1\n", "3.274.1"),
        ("3.274.1", "3.274.1"),
        ("v3.275.0-alpha.1", "3.275.0-alpha.1"),
        ("v3.272.0+dirty", "3.272.0"),
        ("warning: A new version of Pulumi is available.\nv3.274.1\n", "3.274.1"),
        ("", None),
        ("pulumi", None),
        ("v3.274", None),
    ],
)
def test_parse_version(text, expected):
    assert tooling.parse_version(text) == expected


# A go.mod shaped like pulumi's pkg/go.mod: a local replace into the repository and a fork.
PKG_GOMOD = """module github.com/pulumi/pulumi/pkg/v3

go 1.26.6

replace github.com/pulumi/pulumi/sdk/v3 => ../sdk

replace github.com/atotto/clipboard => github.com/tgummerer/clipboard v0.0.0-20241001131231-d02d263e614e

replace example.com/pinned v1.2.3 => example.com/pinned-fork v1.2.4

require (
\tgithub.com/pulumi/pulumi/sdk/v3 v3.274.1
\tgithub.com/spf13/cobra v1.10.2
)
"""

PKG_GOMOD_JSON = {
    "Module": {"Path": "github.com/pulumi/pulumi/pkg/v3"},
    "Go": "1.26.6",
    "Replace": [
        {"Old": {"Path": "github.com/pulumi/pulumi/sdk/v3"}, "New": {"Path": "../sdk"}},
        {"Old": {"Path": "github.com/atotto/clipboard"},
         "New": {"Path": "github.com/tgummerer/clipboard", "Version": "v0.0.0-20241001131231-d02d263e614e"}},
        {"Old": {"Path": "example.com/pinned", "Version": "v1.2.3"},
         "New": {"Path": "example.com/pinned-fork", "Version": "v1.2.4"}},
    ],
}

EXPECTED_WRAPPER = f"""module dn.local/pulumi-build

go 1.26.6

require (
\tgithub.com/pulumi/pulumi/pkg/v3 v{V}
\tgithub.com/pulumi/pulumi/sdk/v3 v{V}
)

replace github.com/atotto/clipboard => github.com/tgummerer/clipboard v0.0.0-20241001131231-d02d263e614e
replace example.com/pinned v1.2.3 => example.com/pinned-fork v1.2.4
"""


def test_replaces_keep_versions_and_know_local_ones():
    rs = tooling.replaces_from_gomod_json(PKG_GOMOD_JSON)
    assert [r.local for r in rs] == [True, False, False]
    assert rs[2].directive() == "replace example.com/pinned v1.2.3 => example.com/pinned-fork v1.2.4"
    assert tooling.Replace("a", None, "./vendor/a", None).local
    assert tooling.Replace("a", None, "/abs/a", None).local
    assert not tooling.Replace("a", None, "example.com/a", "v1.0.0").local


def test_wrapper_gomod_mirrors_only_non_local_replaces():
    tag = f"v{V}"
    text = tooling.wrapper_gomod(
        "1.26.6", {tooling.PKG_MODULE: tag, tooling.SDK_MODULE: tag},
        tooling.replaces_from_gomod_json(PKG_GOMOD_JSON),
    )
    assert text == EXPECTED_WRAPPER
    assert "../sdk" not in text


def test_wrapper_gomod_rejects_a_bad_go_directive():
    with pytest.raises(ValueError, match="go directive"):
        tooling.wrapper_gomod("1.26.6\nreplace x => ../x", {}, [])


@pytest.mark.skipif(shutil.which("go") is None, reason="no Go toolchain on PATH: go mod edit -json not available")
def test_wrapper_from_a_real_go_mod_edit_json(tmp_path):
    """The same wrapper from the go command's own parse of the go.mod (no network involved)."""
    (tmp_path / "go.mod").write_text(PKG_GOMOD)
    out = subprocess.run(["go", "mod", "edit", "-json", str(tmp_path / "go.mod")], capture_output=True,
                         text=True, check=True, env=dict(os.environ, GOFLAGS="", GOTOOLCHAIN="local")).stdout
    doc = json.loads(out)
    tag = f"v{V}"
    text = tooling.wrapper_gomod(doc["Go"], {tooling.PKG_MODULE: tag, tooling.SDK_MODULE: tag},
                                 tooling.replaces_from_gomod_json(doc))
    assert text == EXPECTED_WRAPPER
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "go.mod").write_text(text)
    # the go command accepts what we generated
    subprocess.run(["go", "mod", "edit", "-json", str(tmp_path / "w" / "go.mod")], check=True,
                   capture_output=True, env=dict(os.environ, GOFLAGS="", GOTOOLCHAIN="local"))


def test_decode_json_stream_reads_back_to_back_objects():
    text = '{\n\t"Path": "a",\n\t"Version": "v1"\n}\n{\n\t"Path": "b",\n\t"Error": "403 Forbidden"\n}\n'
    assert tooling.decode_json_stream(text) == [{"Path": "a", "Version": "v1"}, {"Path": "b", "Error": "403 Forbidden"}]
    assert tooling.decode_json_stream("  \n") == []


def test_tools_dir_defaults_and_override(tmp_path):
    assert tooling.tools_dir({"DN_TOOLS_DIR": str(tmp_path / "t")}) == tmp_path / "t"
    assert tooling.tools_dir({"XDG_CACHE_HOME": str(tmp_path / "c")}) == tmp_path / "c" / "dn" / "tools"
    assert tooling.install_root("3.1.2", {"DN_TOOLS_DIR": "/x"}) == Path("/x/pulumi/3.1.2")


# --- provisioning ----------------------------------------------------------------------------


def fake_cli(path: Path, version: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\n[ "$1" = version ] && echo "v{version}" && exit 0\nexit 3\n')
    path.chmod(0o755)
    return path


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return {"DN_TOOLS_DIR": str(tmp_path / "tools"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}


def test_default_source_order():
    assert [name for name, _ in tooling.DEFAULT_SOURCES] == ["path", "installer", "go-build"]
    assert tuple(name for name, _ in tooling.DEFAULT_SOURCES) == tooling.SOURCES


def test_path_source_wins_and_later_sources_are_not_tried(tmp_path, env):
    onpath = tmp_path / "onpath"
    fake_cli(onpath / "pulumi", V)
    env["PATH"] = f"{onpath}:{env['PATH']}"

    def must_not_run(bc):
        raise AssertionError("a later source ran although PATH had the right version")

    prov = tooling.ensure(environ=env, sources=[("path", tooling.from_path), ("installer", must_not_run),
                                                ("go-build", must_not_run)])
    assert prov.ok and prov.installed_now
    cli = next(t for t in prov.tools if t.name == "pulumi")
    assert cli.source == "path" and cli.version == V
    assert (prov.root / "bin" / "pulumi").resolve() == (onpath / "pulumi").resolve()
    assert [a["source"] for a in prov.attempts] == ["path"]


def test_wrong_version_on_path_falls_through_in_order(tmp_path, env):
    onpath = tmp_path / "onpath"
    fake_cli(onpath / "pulumi", "3.1.0")
    env["PATH"] = f"{onpath}:{env['PATH']}"
    calls = []

    def installer(bc):
        calls.append("installer")
        raise tooling.SourceUnavailable("official installer skipped: no internet here")

    def build(bc):
        calls.append("go-build")
        fake_cli(bc.bin / "pulumi", bc.version)
        return {"detail": "built"}

    prov = tooling.ensure(environ=env, sources=[("path", tooling.from_path), ("installer", installer),
                                                ("go-build", build)])
    assert calls == ["installer", "go-build"]
    assert [(a["source"], a["ok"]) for a in prov.attempts] == [("path", False), ("installer", False), ("go-build", True)]
    assert "is 3.1.0" in prov.attempts[0]["reason"] and "no internet" in prov.attempts[1]["reason"]
    assert prov.ok and tooling.read_manifest(prov.root)["pulumi"]["source"] == "go-build"
    assert (prov.root / "bin" / tooling.DYNAMIC_LAUNCHER).stat().st_mode & stat.S_IXUSR


def test_a_source_producing_the_wrong_version_is_rejected(env):
    def wrong(bc):
        fake_cli(bc.bin / "pulumi", "3.0.0")
        return {"detail": "oops"}

    prov = tooling.ensure(environ=env, sources=[("go-build", wrong)])
    assert not prov.ok
    assert prov.attempts == [{"source": "go-build", "ok": False, "reason": f"the result reports 3.0.0, not v{V}"}]
    assert [t.name for t in prov.missing] == ["pulumi", tooling.DYNAMIC_LAUNCHER]
    assert "dn setup" in prov.missing[0].how


def test_nothing_half_installed_when_every_source_fails(env):
    def partial(bc):
        (bc.bin / "pulumi").write_text("half a binary")
        raise tooling.SourceUnavailable("module proxy: 403 Forbidden")

    prov = tooling.ensure(environ=env, sources=[("go-build", partial)])
    assert not prov.ok and not prov.root.exists()
    assert os.listdir(prov.root.parent) == [f".{V}.lock"]  # no staging dir left behind


def test_concurrent_ensure_builds_once(env):
    calls = []

    def slow_build(bc):
        calls.append(threading.get_ident())
        time.sleep(0.5)
        fake_cli(bc.bin / "pulumi", bc.version)
        return {"detail": "built"}

    results = []
    threads = [threading.Thread(target=lambda: results.append(tooling.ensure(environ=env, sources=[("go-build", slow_build)])))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(calls) == 1
    assert len(results) == 3 and all(r.ok for r in results)
    assert sum(r.installed_now for r in results) == 1


def test_installed_version_is_reused_without_trying_sources(env):
    def build(bc):
        fake_cli(bc.bin / "pulumi", bc.version)
        return {"detail": "built"}

    tooling.ensure(environ=env, sources=[("go-build", build)])

    def boom(bc):
        raise AssertionError("rebuilt although the tools dir has the version")

    prov = tooling.ensure(environ=env, sources=[("go-build", boom)])
    assert prov.ok and not prov.installed_now and prov.attempts == []
    assert next(t for t in prov.tools if t.name == "pulumi").source == "go-build"


def test_installer_is_skipped_with_the_probe_reason(tmp_path, env):
    bc = tooling.BuildContext(version=V, staging=tmp_path / "stage", log=lambda m: None, environ=env)
    with pytest.raises(tooling.SourceUnavailable, match="official installer skipped: get.pulumi.com does not resolve"):
        tooling.from_installer(bc, probe=lambda: "get.pulumi.com does not resolve")


def test_probe_reports_a_closed_port_and_accepts_an_open_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    why = tooling.probe_installer("127.0.0.1", port=port, timeout=2)  # nothing listens there any more
    assert why and f"127.0.0.1:{port} unreachable" in why
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        assert tooling.probe_installer("127.0.0.1", port=srv.getsockname()[1], timeout=2) is None


def test_go_build_without_go_says_how(tmp_path, env):
    env["PATH"] = str(tmp_path / "empty")
    bc = tooling.BuildContext(version=V, staging=tmp_path / "stage", log=lambda m: None, environ=env)
    with pytest.raises(tooling.SourceUnavailable, match="no Go toolchain"):
        tooling.from_go_build(bc)


def test_go_env_adds_trimpath_and_static_build():
    env = tooling.go_env({"GOFLAGS": "-buildvcs=false -mod=vendor", "PATH": "/bin"})
    assert env["GOFLAGS"].split() == ["-buildvcs=false", "-trimpath"]
    assert env["CGO_ENABLED"] == "0" and env["GOWORK"] == "off"
    assert "GOMODCACHE" not in env and "GOCACHE" not in env  # the machine's shared caches


# --- launchers -------------------------------------------------------------------------------


def test_dynamic_launcher_execs_the_configured_python(tmp_path):
    path = tooling.write_dynamic_launcher(tmp_path)
    assert path.name == "pulumi-resource-pulumi-python" and os.access(path, os.X_OK)
    probe = tmp_path / "argv.py"
    probe.write_text("import sys, json; print(json.dumps(sys.argv[1:]))")
    # stand in for `python -u -m pulumi.dynamic ARGS`: a python that reports what it was asked to run
    fake_python = tmp_path / "py"
    fake_python.write_text(f'#!/bin/sh\nexec {sys.executable} {probe} "$@"\n')
    fake_python.chmod(0o755)
    out = subprocess.run([str(path), "127.0.0.1:1234", "--logflow", "two words"], capture_output=True, text=True,
                         env={"PULUMI_PYTHON_CMD": str(fake_python), "PATH": "/usr/bin:/bin"}, check=True).stdout
    assert json.loads(out) == ["-u", "-m", "pulumi.dynamic", "127.0.0.1:1234", "--logflow", "two words"]


def test_policy_launcher_quotes_the_pack_path(tmp_path):
    pack = tmp_path / "pack with 'quotes'"
    pack.mkdir()
    (pack / "__main__.py").write_text("")
    launcher = tooling.policy_pack_launcher(pack, tmp_path / "data")
    assert launcher.parent.parent == tmp_path / "data" / "policy-launchers"
    out = subprocess.run(["sh", "-n", str(launcher)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    probe = tmp_path / "argv.py"
    probe.write_text("import sys, json; print(json.dumps(sys.argv[1:]))")
    fake_python = tmp_path / "py"
    fake_python.write_text(f'#!/bin/sh\nexec {sys.executable} {probe} "$@"\n')
    fake_python.chmod(0o755)
    got = subprocess.run([str(launcher), "127.0.0.1:999"], capture_output=True, text=True, check=True,
                         env={"PULUMI_PYTHON_CMD": str(fake_python), "PATH": "/usr/bin:/bin"}).stdout
    assert json.loads(got) == ["-u", "-m", "pulumi.policy", "127.0.0.1:999", str(pack.resolve())]


def test_policy_launcher_needs_a_python_pack(tmp_path):
    with pytest.raises(ConfigError, match="not a Python policy pack"):
        tooling.policy_pack_launcher(tmp_path, tmp_path / "data")


# --- the engine environment ------------------------------------------------------------------


def settings_for(tmp_path, extra_env=None):
    env = {"DN_HOME": str(tmp_path / "dn"), "XDG_CONFIG_HOME": str(tmp_path / "cfg"), **(extra_env or {})}
    return load_settings(environ=env)


def test_engine_env_with_a_passphrase_file(tmp_path):
    s = settings_for(tmp_path)
    pf = Path(s.secrets.passphrase_file)
    pf.parent.mkdir(parents=True)
    pf.write_text("s3cret passphrase\n")
    pf.chmod(0o600)
    env = tooling.engine_env(s, {"PATH": "/usr/bin", "DN_TOOLS_DIR": str(tmp_path / "tools")})
    assert env["PATH"].split(os.pathsep) == [str(tmp_path / "tools" / "pulumi" / V / "bin"), "/usr/bin"]
    assert env["PULUMI_HOME"] == str(tmp_path / "dn" / "pulumi-home")
    assert env["PULUMI_PYTHON_CMD"] == sys.executable
    assert env["PULUMI_SKIP_UPDATE_CHECK"] == "true"
    assert env["PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION"] == "true"
    assert env["PULUMI_BACKEND_URL"] == f"file://{tmp_path / 'dn' / 'state'}"
    assert env["PULUMI_CONFIG_PASSPHRASE_FILE"] == str(pf)
    assert "PULUMI_CONFIG_PASSPHRASE" not in env
    assert "s3cret" not in json.dumps(env)


def test_engine_env_with_a_passphrase_variable_is_masked_for_display(tmp_path):
    cfg = tmp_path / "cfg" / "dn"
    cfg.mkdir(parents=True)
    (cfg / "config.toml").write_text(f'data_dir = "{tmp_path / "dn"}"\n[secrets]\npassphrase_env = "MY_PASS"\n')
    s = load_settings(environ={"DN_CONFIG": str(cfg / "config.toml")})
    env = tooling.engine_env(s, {"MY_PASS": "hunter2-passphrase", "PATH": "/bin"})
    assert env["PULUMI_CONFIG_PASSPHRASE"] == "hunter2-passphrase"
    shown = tooling.describe_env(env)
    assert "hunter2" not in json.dumps(shown) and shown["PULUMI_CONFIG_PASSPHRASE"] == "<set, not shown>"
    with pytest.raises(ConfigError) as ei:
        tooling.engine_env(s, {"PATH": "/bin"})
    assert "secrets.passphrase_env" in str(ei.value) and "$MY_PASS" in str(ei.value)


def test_engine_env_refuses_a_missing_or_readable_passphrase_file(tmp_path):
    s = settings_for(tmp_path)
    with pytest.raises(ConfigError, match="secrets.passphrase_file: .* does not exist"):
        tooling.engine_env(s, {"PATH": "/bin"})
    pf = Path(s.secrets.passphrase_file)
    pf.parent.mkdir(parents=True)
    pf.write_text("x" * 20)
    pf.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by group or others") as ei:
        tooling.engine_env(s, {"PATH": "/bin"})
    assert "x" * 20 not in str(ei.value) + (ei.value.hint or "")
