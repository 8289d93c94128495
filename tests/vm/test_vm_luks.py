"""dn's LUKS code path (dn/host/luks.py) on a machine with device-mapper: the volume is opened,
given a filesystem, mounted, written, unmounted, closed and crypto-erased. The netns sandbox
cannot do this (no device-mapper in this machine's kernel)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.vm


def test_dm_crypt_loads(vm_host):
    vm_host.run(["modprobe", "dm_crypt"])
    assert vm_host.run(["dmsetup", "version"], check=False).rc == 0
    assert "crypt" in vm_host.run(["dmsetup", "targets"]).text


def test_luks_volume_opens_mounts_and_is_crypto_erased(vm_host):
    from dn.host import luks

    spec = luks.VolumeSpec(name="vmt", image="/var/lib/dn/volumes/vmt.img", size_mb=64,
                           mapper="dn-vol-vmt", mount="/srv/dn/tenants/vmt")
    key = luks.new_key()
    with vm_host.session() as s:
        luks.remove(s, spec)  # a rerun after a failed session starts clean
        before = luks.read(s, spec)
        assert before.dm and not before.exists
        the_plan = luks.plan(spec, before, where=s.where)
        assert [c.action for c in the_plan.changes] == ["allocate", "format", "verify", "open", "mkfs", "mount"]
        assert luks.DM_MISSING not in the_plan.notes
        luks.apply(s, spec, the_plan, key)
        st = luks.read(s, spec)
        assert st.is_luks and st.opened and st.mounted
        assert st.header.cipher == luks.CIPHER and st.header.key_bits == luks.KEY_BITS
        assert s.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", spec.mount]).text.split()[:2] == \
            [spec.mapper_path, "ext4"]
        s.run(["sh", "-c", f"echo tenant-data > {spec.mount}/probe && sync"])
        assert s.read_file(f"{spec.mount}/probe") == b"tenant-data\n"
        # the plaintext is on the mapper only: the backing file holds ciphertext
        assert s.run(["grep", "-c", "tenant-data", spec.image], check=False).rc == 1
        assert luks.plan(spec, st, where=s.where).empty  # converged

        # closed (as after a reboot): the plan reopens and remounts, and the data is still there
        s.run(["umount", spec.mount])
        s.run(["cryptsetup", "close", spec.mapper])
        st = luks.read(s, spec)
        assert not st.opened and not st.mounted
        reopen = luks.plan(spec, st, where=s.where)
        assert [c.action for c in reopen.changes] == ["open", "mkfs", "mount"]
        luks.apply(s, spec, reopen, key)
        assert s.read_file(f"{spec.mount}/probe") == b"tenant-data\n"  # mkfs only on a blank device

        luks.remove(s, spec)
        gone = luks.read(s, spec)
        assert not gone.exists and not gone.opened and not gone.mounted
        assert s.run(["dmsetup", "info", spec.mapper], check=False).rc != 0
