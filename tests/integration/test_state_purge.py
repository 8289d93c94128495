"""Removing a stack leaves no copy of its state, against the real Pulumi CLI and a file backend.

Pulumi's own ``stack rm`` keeps ``stacks/<name>.json.bak`` and ``backups/<project>/<name>/`` (every
checkpoint, secrets encrypted under dn's passphrase with the salt beside them); dn's destroy
removes the stack with its history, backups, .bak files and work dir (Pulumi.<name>.yaml: the
salt and the secret config), then searches the whole backend and the work dirs. Another stack
whose name starts the same is never touched.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from pulumi.automation import ConfigValue

from dn import engine
from tests.integration.test_engine import (  # noqa: F401 (fixtures)
    CONFIG_SECRET,
    backend_dir,
    env,
    file_program,
    needs_cli,
    open_stack,
    settings,
)

pytestmark = [pytest.mark.engine, needs_cli]

CIPHERTEXT = re.compile(r"v1:[A-Za-z0-9+/=]{8,}:[A-Za-z0-9+/=:]{8,}")


def names_stack(part: str, name: str) -> bool:
    return part == name or part.startswith(f"{name}.") or re.match(rf"^{re.escape(name)}-\d+\.", part) is not None


def files(*roots: Path) -> list[Path]:
    return sorted(p for r in roots if r.is_dir() for p in r.rglob("*") if p.is_file())


def naming(roots: list[Path], name: str) -> list[Path]:
    return [p for r in roots for p in files(r) if any(names_stack(x, name) for x in p.relative_to(r).parts)]


def ciphertexts(paths: list[Path]) -> set[str]:
    return {m for p in paths for m in CIPHERTEXT.findall(p.read_text(errors="replace"))}


def holding(roots: list[Path], markers: set[str]) -> list[Path]:
    return [p for p in files(*roots) if any(m in p.read_text(errors="replace") for m in markers)]


def make(settings, env, tmp_path, name: str, rounds: int):
    st = open_stack(settings, env, file_program(tmp_path / "out" / f"{name}.conf", "v0"), name=name)
    st.set_config("apiKey", ConfigValue(value=CONFIG_SECRET, secret=True))
    for i in range(rounds):  # every update leaves a checkpoint backup and a history entry
        st = open_stack(settings, env, file_program(tmp_path / "out" / f"{name}.conf", f"v{i}"), name=name)
        engine.up(st)
    return st


def test_destroy_leaves_no_copy_of_the_stacks_state(settings, env, tmp_path):
    backend = backend_dir(settings)
    work_root = engine.stack_work_dir(settings, "x").parent
    roots = [backend, work_root]
    st = make(settings, env, tmp_path, "victim", rounds=3)
    other = make(settings, env, tmp_path, "victim-two", rounds=1)
    own = naming(roots, "victim")
    markers = ciphertexts(own)
    # what is there to remove: checkpoints in backups/, history, the work dir's salt and config
    assert any("/backups/" in str(p) for p in own) and any("/history/" in str(p) for p in own)
    assert (work_root / "victim" / "Pulumi.victim.yaml") in own and markers
    assert holding([backend / ".pulumi" / "backups"], markers)
    other_files = {p: p.read_bytes() for p in naming(roots, "victim-two")}

    out = engine.destroy(st, remove=True)

    pg = out.purge
    assert pg is not None and pg.checked and pg.remaining == [], pg
    assert pg.markers >= len(markers) and pg.files_searched > 0 and sorted(pg.searched) == sorted(map(str, roots))
    assert naming(roots, "victim") == []
    assert holding(roots, markers) == []
    assert not (work_root / "victim").exists()
    # the other stack is whole and still works
    assert {p: p.read_bytes() for p in naming(roots, "victim-two")} == other_files
    assert engine.up(other).changed == 0
    engine.destroy(other, remove=True)
    assert naming(roots, "victim-two") == []


def test_what_an_earlier_removal_left_is_purged_later(settings, env, tmp_path):
    """A stack removed by Pulumi's plain ``stack rm`` (dn before this change, or a run killed
    between the removal and the purge) still has its .bak and backups: purging the name again
    removes them; a second purge finds nothing and changes nothing."""
    backend = backend_dir(settings)
    work_root = engine.stack_work_dir(settings, "x").parent
    st = make(settings, env, tmp_path, "leftover", rounds=2)
    markers = ciphertexts(naming([backend, work_root], "leftover"))
    st.destroy()
    st.workspace.remove_stack("leftover")
    left = naming([backend], "leftover")
    assert any(p.name == "leftover.json.bak" for p in left) and any("/backups/" in str(p) for p in left)

    pg = engine.purge_stack(settings.backend_url, work_root, "leftover")

    assert pg.remaining == [] and pg.checked
    assert all(any(str(p) == r or str(p).startswith(r + "/") for r in pg.removed) for p in left), (left, pg.removed)
    assert naming([backend, work_root], "leftover") == [] and holding([backend, work_root], markers) == []
    again = engine.purge_stack(settings.backend_url, work_root, "leftover")
    assert again.removed == [] and again.remaining == []


def test_a_rerun_destroy_of_a_removed_stack_purges_what_is_left(settings, env, tmp_path):
    """`dn tenant destroy` / the GDPR stack step rerun after the stack itself was removed (no work
    dir any more) still removes the stack's leftovers instead of reporting nothing to do."""
    from dn import tenants
    from dn.context import Context
    from dn.models import TenantSpec

    backend = backend_dir(settings)
    work_root = engine.stack_work_dir(settings, "x").parent
    st = make(settings, env, tmp_path, "rerun", rounds=2)
    st.destroy()
    st.workspace.remove_stack("rerun")  # Pulumi's plain removal: .bak and backups stay
    shutil.rmtree(work_root / "rerun")
    assert naming([backend], "rerun")
    ctx = Context(environ=env, _settings=settings)
    assert tenants.destroy_stack(ctx, TenantSpec.model_construct(slug="rerun"), []) is None
    assert naming([backend, work_root], "rerun") == []
