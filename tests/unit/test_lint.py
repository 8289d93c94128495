"""ruff (lint and format) and mypy over the tree, through scripts/lint: the same commands CI runs and
.pre-commit-config.yaml runs. Configuration is pyproject.toml's [tool.ruff] and [tool.mypy] (strict
on the pure core). A new finding fails the suite; a missing tool fails too (scripts/setup installs
both from requirements.txt). zizmor checks .github/dependabot.yml here; the workflow checkers run
in tests/unit/test_workflows.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = ROOT / "scripts" / "lint"

pytestmark = pytest.mark.lint


def _lint(check: str, timeout: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT), check], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("check", ["ruff", "format", "types", "dependabot"])
def test_tree_is_clean(check):
    r = _lint(check, timeout=900)
    assert r.returncode == 0, f"scripts/lint {check} failed:\n{r.stdout[-6000:]}\n{r.stderr[-2000:]}"


def test_lint_refuses_an_unknown_check():
    # A typo in CI's or pre-commit's check name must fail, never run nothing and pass.
    r = _lint("rufff", timeout=30)
    assert r.returncode == 2 and "unknown check 'rufff'" in r.stderr


@pytest.mark.parametrize(
    "check, source, rule",
    [
        ("ruff", "import os\n", "F401"),  # an unused import
        ("ruff", "import subprocess\nsubprocess.run('x', shell=True)\n", "S602"),
        ("format", "x = {  'a':1 }\n", "would be reformatted"),
    ],
)
def test_lint_finds_a_planted_finding(tmp_path, check, source, rule):
    """The configured checks can fail: a file with a known finding, in a copy of the configuration."""
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "lint").write_text(LINT.read_text())
    (tmp_path / "scripts" / "lint").chmod(0o755)
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    (tmp_path / "planted.py").write_text(source)
    r = subprocess.run(
        [str(tmp_path / "scripts" / "lint"), check], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 1 and rule in r.stdout + r.stderr, r.stdout + r.stderr


def test_types_are_strict_on_the_pure_core_only(tmp_path):
    """The same untyped function fails in a pure-core module (dn/errors.py) and passes elsewhere."""
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "lint").write_text(LINT.read_text())
    (tmp_path / "scripts" / "lint").chmod(0o755)
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    for pkg in ("dn", "cli", "stacks"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    untyped = "def double(x):\n    return x * 2\n"
    (tmp_path / "dn" / "errors.py").write_text(untyped)
    (tmp_path / "dn" / "tenants.py").write_text(untyped)
    r = subprocess.run(
        [str(tmp_path / "scripts" / "lint"), "types"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "dn/errors.py:1: error: Function is missing a type annotation" in out, out
    assert "dn/tenants.py" not in out, out
