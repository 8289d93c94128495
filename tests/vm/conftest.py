"""The VM tier: tests against the VM sandbox host (a booted Debian 12 machine under QEMU).

The session fixture ``vm_host`` runs ``dn.vm.up`` once (the image is built once per machine and
cached; a boot takes seconds under KVM, about a minute under TCG) and stops the VM at the end if
this session started it. A missing prerequisite (root, qemu, debootstrap, /dev/net/tun) is a
failure when ``CI=true`` (the tier must run in CI) and a skip with its reason otherwise. Test
sessions take ``/run/lock/dn-vm.tests.lock`` so one at a time uses the one VM.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TESTS_LOCK = Path("/run/lock/dn-vm.tests.lock")


def unavailable_reason() -> str | None:
    """Why the VM tier cannot run on this machine, or None."""
    from dn import vm

    if os.geteuid() != 0:
        return "the VM tier needs root (debootstrap, tap device, QEMU)"
    missing = [t for t in ("debootstrap", vm.QEMU, "qemu-img", "mkfs.ext4", "debugfs", "unshare")
               if not shutil.which(t, path=vm.DAEMON_ENV["PATH"])]
    if missing:
        return f"missing {', '.join(missing)} (scripts/setup installs qemu-system-x86 qemu-utils debootstrap)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing: no tap device"
    return None


def require_vm() -> None:
    why = unavailable_reason()
    if why is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"VM tier prerequisite missing in CI: {why}", pytrace=False)
    pytest.skip(why)


@dataclass
class VMHandle:
    data_dir: Path
    config: Path
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def target(self):
        from dn import vm

        return vm.target(self.data_dir)

    def session(self):
        from dn import ssh

        return ssh.connect(self.target)

    def run(self, argv: list[str], *, check: bool = True, timeout: float = 300, stdin: bytes | None = None):
        with self.session() as s:
            return s.run(argv, check=check, timeout=timeout, stdin=stdin)


@pytest.fixture(scope="session")
def vm_host(tmp_path_factory) -> Iterator[VMHandle]:
    from dn import vm

    require_vm()
    TESTS_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(TESTS_LOCK, "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        started_here = vm.qemu_pid() is None
        data_dir = tmp_path_factory.mktemp("vm") / "dn"
        data_dir.mkdir(mode=0o700)
        timings: dict[str, float] = {}
        t = time.monotonic()
        rcp = vm.machine_recipe()
        cached = vm.Image(vm.cache_dir() / rcp.key).complete
        vm.build(rcp, progress=lambda m: print(f"vm: {m}", flush=True))
        timings["build_s" if not cached else "cached_build_s"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        _, config = vm.up(data_dir, progress=lambda m: print(f"vm: {m}", flush=True))
        timings["up_s"] = round(time.monotonic() - t, 1)
        handle = VMHandle(data_dir, config, timings)
        try:
            yield handle
        finally:
            print(f"vm tier timings: {timings}", flush=True)
            if started_here:
                vm.down(data_dir)
