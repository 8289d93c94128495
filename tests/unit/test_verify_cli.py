"""dn verify's command line where no host is needed: listing, input errors, an empty history."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dn.verify.claims import ids

DN = str(Path(sys.executable).parent / "dn")


def run(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DN_")}
    env.update(DN_HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "cfg"))
    return subprocess.run([DN, *args], env=env, capture_output=True, text=True, timeout=60)


def test_list_names_every_check(tmp_path):
    r = run(tmp_path, "verify", "list", "--json")
    assert r.returncode == 0
    assert [c["id"] for c in json.loads(r.stdout)] == ids()


def test_unknown_check_and_format_are_invalid_input_before_anything_is_contacted(tmp_path):
    r = run(tmp_path, "verify", "--check", "net.nope")
    assert r.returncode == 2 and "--check: no check 'net.nope'" in r.stderr and r.stdout == ""
    r = run(tmp_path, "verify", "--format", "xml")
    assert r.returncode == 2 and "--format: must be one of table, json, markdown" in r.stderr
    r = run(tmp_path, "verify", "--host", "nowhere")
    assert r.returncode == 2 and "host: unknown host 'nowhere'" in r.stderr
    assert not (tmp_path / "home" / "evidence").exists()


def test_history_before_any_run(tmp_path):
    r = run(tmp_path, "verify", "history", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"runs": 0, "checks": []}
    r = run(tmp_path, "verify", "history")
    assert r.returncode == 0 and "no verify run recorded yet" in r.stderr
