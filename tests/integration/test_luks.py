"""A tenant's LUKS2 volume on the sandbox EU host, made, checked and crypto-erased over SSH.

The sandbox kernel has no device-mapper: the volume is formatted, dumped and its key tested,
but not opened (the plan says so). Formatting runs argon2id at cryptsetup's default cost, so the
module makes one volume and every test works on it; the last one erases it.
"""
from __future__ import annotations

import base64
import json
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dn import ssh
from dn.config import PlanConfig
from dn.errors import OperationFailed
from dn.host import luks
from dn.host.plan import Applied
from dn.models import HostBaseline, parse_tenant
from dn.sandbox import IMAGE

pytestmark = pytest.mark.sandbox
PLANS = {"small": PlanConfig(volume_mb=32), "bigger": PlanConfig(volume_mb=48)}


def tenant(slug: str, plan: str = "small"):
    return parse_tenant({"slug": slug, "domains": [f"{slug}.example"], "image": IMAGE, "subnet": "10.210.30.0/28",
                         "plan": plan}, plans=PLANS, host_view=True)


@dataclass
class Vol:
    host: HostBaseline
    spec: luks.VolumeSpec
    key: bytes
    created: Applied
    argvs: list[list[str]]
    stdins: list[bytes]
    started: float


def test_passphrase(sandbox, image: str, key: bytes) -> bool:
    return sandbox.ns_exec(["cryptsetup", "open", "--test-passphrase", "--key-file=-", image], input=key,
                           check=False).returncode == 0


test_passphrase.__test__ = False  # a helper, not a test


def dump(sandbox, image: str) -> str:
    return sandbox.ns_exec(["cryptsetup", "luksDump", image]).stdout.decode()


@pytest.fixture(scope="module")
def vol(sandbox) -> Iterator[Vol]:
    host = HostBaseline.from_settings(sandbox.settings)
    spec = luks.volume_spec(host, tenant("lka"))
    key = luks.new_key()
    argvs: list[list[str]] = []
    stdins: list[bytes] = []
    real_run = ssh.Session.run

    def spy(self, argv, *, stdin=None, **kw):  # records what really went over the wire
        argvs.append(list(argv))
        if stdin is not None:
            stdins.append(bytes(stdin))
        return real_run(self, argv, stdin=stdin, **kw)

    started = time.time()
    mp = pytest.MonkeyPatch()
    mp.setattr(ssh.Session, "run", spy)
    try:
        with ssh.connect(sandbox.host) as s:
            luks.remove(s, spec)  # leftovers of an interrupted earlier run
            created = luks.converge(s, spec, key)
    finally:
        mp.undo()
    try:
        yield Vol(host, spec, key, created, argvs, stdins, started)
    finally:
        with ssh.connect(sandbox.host) as s:
            luks.remove(s, spec)


def test_the_volume_is_luks2_aes_xts_512_with_argon2id_and_the_key_opens_it(vol, sandbox):
    steps = [c.action for c in vol.created.plan.changes]
    assert steps[:3] == ["allocate", "format", "verify"]
    text = dump(sandbox, vol.spec.image)
    assert "Version:       \t2" in text
    assert "cipher: aes-xts-plain64" in text
    assert "Cipher key: 512 bits" in text and "PBKDF:      argon2id" in text
    st = os.stat(vol.spec.image)  # the sandbox host shares this machine's filesystem
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 32 * 1024 * 1024
    assert test_passphrase(sandbox, vol.spec.image, vol.key)
    assert not test_passphrase(sandbox, vol.spec.image, luks.new_key())
    with ssh.connect(sandbox.host) as s:
        state = luks.read(s, vol.spec)
    assert state.header.to_dict()["keyslots"] == [{"id": 0, "key_bits": 512, "cipher": "aes-xts-plain64", "pbkdf": "argon2id"}]
    if state.dm:  # a host with device-mapper opens and mounts it
        assert state.opened and state.mounted
    else:
        assert luks.DM_MISSING in vol.created.notes


def test_the_key_travels_only_on_stdin_and_is_stored_nowhere_on_the_host(vol):
    forms = [vol.key, vol.key.hex().encode(), base64.b64encode(vol.key)]
    for argv in vol.argvs:
        joined = "\0".join(argv).encode()
        assert not any(f in joined for f in forms), argv
    assert vol.key in vol.stdins  # it was given, on stdin
    assert any(a[:2] == ["cryptsetup", "luksFormat"] and "--key-file=-" in a for a in vol.argvs)
    root = Path(vol.host.prefix)
    for d in (root / "var/lib/dn", root / "var/log", root / "etc", root / "run", root / "tmp", Path("/tmp")):
        for path in (d.rglob("*") if d.exists() else ()):
            if path.is_file() and not path.is_symlink() and path != Path(vol.spec.image):
                try:
                    if path.stat().st_mtime < vol.started - 1:
                        continue  # written before the volume was made
                    data = path.read_bytes()
                except OSError:
                    continue
                assert not any(f in data for f in forms), path


def test_a_second_apply_changes_nothing_and_an_existing_volume_is_never_formatted_again(vol, sandbox):
    uuid = [line for line in dump(sandbox, vol.spec.image).splitlines() if line.startswith("UUID:")]
    with ssh.connect(sandbox.host) as s:
        again = luks.converge(s, vol.spec, vol.key)
        assert again.plan.empty
        with pytest.raises(OperationFailed) as ei:
            luks._format(s, vol.spec, luks.new_key())  # even when asked directly, isLuks stops it
    assert "already a LUKS volume" in str(ei.value)
    assert [line for line in dump(sandbox, vol.spec.image).splitlines() if line.startswith("UUID:")] == uuid
    assert test_passphrase(sandbox, vol.spec.image, vol.key)


def test_a_file_that_holds_data_is_never_formatted(vol, sandbox):
    other = luks.volume_spec(vol.host, tenant("lkb"))
    data = os.urandom(1024 * 1024)
    Path(other.image).write_bytes(data)
    try:
        with ssh.connect(sandbox.host) as s:
            p = luks.plan(other, luks.read(s, other))
            assert any(n.startswith("refused:") and "holds data" in n for n in p.notes)
            with pytest.raises(OperationFailed):
                luks.converge(s, other, luks.new_key())
        assert Path(other.image).read_bytes() == data
    finally:
        Path(other.image).unlink(missing_ok=True)


def test_growing_keeps_the_volume_and_its_key(vol, sandbox):
    bigger = luks.volume_spec(vol.host, tenant("lka", plan="bigger"))
    assert bigger.image == vol.spec.image
    with ssh.connect(sandbox.host) as s:
        grown = luks.converge(s, bigger, vol.key)
        assert [c.action for c in grown.plan.changes][:1] == ["grow"]
        with pytest.raises(OperationFailed) as ei:  # and shrinking back is refused
            luks.converge(s, vol.spec, vol.key)
    assert "shrinking" in str(ei.value)
    assert os.stat(vol.spec.image).st_size == 48 * 1024 * 1024
    assert test_passphrase(sandbox, vol.spec.image, vol.key)


def test_delete_is_a_crypto_erase_of_the_volume_and_its_header_backup(vol, sandbox, tmp_path):
    image = vol.spec.image
    backup = image + luks.HEADER_SUFFIX
    sandbox.ns_exec(["cryptsetup", "luksHeaderBackup", image, "--header-backup-file", backup])
    # Second names for the same inodes: they show what happened to the bytes after the removal.
    keep = {p: f"{vol.host.path('/var/tmp')}/dn-test-{os.path.basename(p)}" for p in (image, backup)}
    os.makedirs(vol.host.path("/var/tmp"), exist_ok=True)
    for p, link in keep.items():
        if os.path.exists(link):
            os.unlink(link)
        os.link(p, link)
    try:
        with ssh.connect(sandbox.host) as s:
            removed = luks.remove(s, vol.spec)
            assert luks.remove(s, vol.spec).plan.empty
        assert [c.action for c in removed.plan.changes] == ["erase", "erase", "delete"]
        assert not os.path.exists(image) and not os.path.exists(backup)
        for link in keep.values():
            meta = json.loads(sandbox.ns_exec(["cryptsetup", "luksDump", "--dump-json-metadata", link]).stdout)
            assert meta["keyslots"] == {}, link  # no keyslot remains
            assert not test_passphrase(sandbox, link, vol.key), link  # the key opens nothing any more
    finally:
        for link in keep.values():
            if os.path.exists(link):
                os.unlink(link)
