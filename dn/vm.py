"""The VM sandbox host: a booted Debian 12 machine under QEMU, the second kind of sandbox host.

Where the netns sandbox (dn/sandbox.py) shares this machine's kernel and filesystem, this one is
a real machine: its own kernel (device-mapper, so LUKS volumes open and mount), systemd as PID 1
(timers are enabled and fire), journald, and dn's files at the production paths (host prefix
``/``). ``dn sandbox up --vm`` makes it; the netns sandbox stays the default and is never touched.

Image (built once per machine, cached by the hash of its :class:`Recipe`):

- ``debootstrap --variant=minbase`` of Debian 12 from the mirror this machine's apt uses, then
  :data:`PACKAGES` and the kernel installed with apt inside the chroot (a private mount
  namespace: nothing of the chroot's /proc, /sys, /dev outlives the build; ``policy-rc.d``
  keeps the packages' daemons from starting on this machine during the build);
- dn's Python dependencies in a venv ``/opt/dn`` (wheels of exactly the versions this dn runs
  with); dn itself is deployed into it at each ``up`` (:func:`deploy_dn`), so the image does not
  change with every commit;
- an ed25519 SSH host key and dn's client key generated at build time: the host key is pinned
  (``known_hosts`` is written from the key read back out of the image, never learnt by
  connecting), root logs in with the client key only;
- packed with ``mkfs.ext4 -d`` into a raw image; the kernel and initramfs are copied out of its
  /boot. Cache: ``$XDG_CACHE_HOME/dn/vm/<hash>/`` (``~/.cache/dn/vm``).

Boot: a qcow2 overlay on the cached image (the cached image is never written), QEMU with KVM
only when a short probe boot proved that KVM guests run here (else TCG), 2 vCPUs, 2 GiB, a
virtio disk and a virtio NIC on the tap device :data:`TAP` (10.231.9.1/24 on this machine,
10.231.9.2 in the guest, static through systemd-networkd; no default route: the guest reaches
nothing but this machine). State under :data:`VM_ROOT`; lock :data:`LOCK_PATH`.

The pure parts (recipe, its hash, QEMU argv, guest files, known_hosts, the configuration file)
are separate from the process-running parts (build, boot, stop, status).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from dn.errors import Locked, OperationFailed
from dn.sandbox import pid_alive

# --------------------------------------------------------------------------------------------
# the recipe (pure)
# --------------------------------------------------------------------------------------------
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# What a production EU host runs, from Debian packages only. The one list of the image's packages.
PACKAGES = (
    "systemd", "systemd-sysv", "udev", "kmod", "dbus", "openssh-server", "cryptsetup", "iproute2",
    "e2fsprogs", "util-linux", "docker.io", "nginx", "iptables", "postgresql", "python3",
    "python3-venv", "ca-certificates", "procps",
)
KERNEL_PACKAGES = ("linux-image-cloud-amd64", "initramfs-tools")
# Bump when the build procedure changes in a way the recipe's data does not show.
RECIPE_VERSION = 1
IMAGE_SIZE_MB = 8192  # sparse: room for docker images, PostgreSQL and tenant volumes

HOSTNAME = "dn-vm"
TAP = "dn-vm0"
NETWORK = "10.231.9.0/24"
HOST_ADDR = "10.231.9.1"  # this machine's end of the tap device
GUEST_ADDR = "10.231.9.2"
PREFIXLEN = 24
GUEST_MAC = "52:54:00:e7:09:02"
VCPUS = 2
MEMORY_MB = 2048
HOST_NAME = "vm-eu1"  # the host's name in dn's configuration
VENV = "/opt/dn"
DN_SRC = "/opt/dn/src"
DN_BIN = "/usr/local/bin/dn"
# dn's source tree as deployed onto the host (what an editable install points at).
DN_TREE = ("dn", "cli", "stacks", "templates", "policies", "runbooks", "pyproject.toml")

VM_ROOT = Path("/srv/dn-vm")
LOCK_PATH = Path("/run/lock/dn-vm.lock")
QEMU = "qemu-system-x86_64"
DAEMON_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def apt_mirror(sources: Sequence[str]) -> str:
    """The Debian mirror of this machine's apt sources (``/etc/apt/sources.list*``, one-line or
    deb822 format): the first URI that serves suite ``bookworm``; :data:`DEFAULT_MIRROR` if none."""
    for text in sources:
        for line in text.splitlines():
            m = re.match(r"^\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
            if m and m.group(2) == SUITE:
                return m.group(1).rstrip("/")
        for stanza in re.split(r"\n\s*\n", text):
            fields = {}
            for line in stanza.splitlines():
                m = re.match(r"^([A-Za-z-]+):\s*(.*)$", line)
                if m:
                    fields[m.group(1).lower()] = m.group(2).split()
            if SUITE in fields.get("suites", []) and "deb" in fields.get("types", ["deb"]) and fields.get("uris"):
                return fields["uris"][0].rstrip("/")
    return DEFAULT_MIRROR


def _req_name(req: str) -> tuple[str, set[str], str]:
    """``name[extra,...] (spec) ; marker`` → (normalised name, extras, marker)."""
    body, _, marker = req.partition(";")
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^]]*)\])?", body)
    if not m:
        raise ValueError(f"not a requirement: {req!r}")
    extras = {e.strip().lower() for e in (m.group(2) or "").split(",") if e.strip()}
    return re.sub(r"[-_.]+", "-", m.group(1)).lower(), extras, marker.strip()


def requirements(root: str, requires: Callable[[str], Sequence[str] | None],
                 version: Callable[[str], str | None]) -> tuple[str, ...]:
    """The pinned runtime closure of distribution ``root`` (without ``root`` itself, which is
    deployed at ``up``): ``requires(name)`` gives a distribution's requirement strings,
    ``version(name)`` its installed version (None: not installed, its marker is false here).
    A requirement behind ``extra == "x"`` counts only when that extra was asked for."""
    pins: dict[str, str] = {}
    todo: list[tuple[str, set[str]]] = [(_req_name(root)[0], set())]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, frozenset(extras)) in seen:
            continue
        seen.add((name, frozenset(extras)))
        for req in requires(name) or ():
            dep, dep_extras, marker = _req_name(req)
            wanted = re.findall(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
            if wanted and not extras & {w.lower() for w in wanted}:
                continue
            v = version(dep)
            if v is None:
                continue
            pins[dep] = v
            todo.append((dep, dep_extras))
    pins.pop(_req_name(root)[0], None)
    return tuple(f"{n}=={v}" for n, v in sorted(pins.items()))


def installed_requirements(root: str = "dn") -> tuple[str, ...]:
    """:func:`requirements` from this interpreter's installed distributions."""
    from importlib import metadata

    def requires(name: str) -> Sequence[str] | None:
        try:
            return metadata.requires(name)
        except metadata.PackageNotFoundError:
            return None

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return requirements(root, requires, version)


def networkd_unit(address: str = GUEST_ADDR, prefixlen: int = PREFIXLEN, mac: str = GUEST_MAC) -> str:
    """The guest's systemd-networkd file: a static address on the NIC with dn's MAC, no gateway."""
    return ("# Managed by dn (the VM sandbox host): the tap link to the machine that runs it.\n"
            "[Match]\n"
            f"MACAddress={mac}\n\n"
            "[Network]\n"
            f"Address={address}/{prefixlen}\n"
            "LinkLocalAddressing=no\n"
            "IPv6AcceptRA=no\n")


def sshd_dropin() -> str:
    return ("# Managed by dn: key-only root login, the one host key pinned by dn.\n"
            "HostKey /etc/ssh/ssh_host_ed25519_key\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UseDNS no\n")


def guest_files(mirror: str) -> dict[str, str]:
    """Files the image holds besides its packages (path in the guest → content)."""
    return {
        "/etc/hostname": HOSTNAME + "\n",
        "/etc/hosts": f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n::1 localhost ip6-localhost ip6-loopback\n",
        "/etc/fstab": "/dev/vda / ext4 rw,errors=remount-ro 0 1\n",
        "/etc/systemd/network/10-dn.network": networkd_unit(),
        "/etc/ssh/sshd_config.d/10-dn.conf": sshd_dropin(),
        "/etc/apt/sources.list": f"deb {mirror} {SUITE} main\ndeb {mirror} {SUITE}-updates main\n",
        # the guest resolves nothing: it reaches only this machine
        "/etc/resolv.conf": "",
    }


@dataclass(frozen=True)
class Recipe:
    """Everything the image is made from; its :attr:`digest` names the cached image."""

    suite: str = SUITE
    packages: tuple[str, ...] = PACKAGES
    kernel: tuple[str, ...] = KERNEL_PACKAGES
    python: tuple[str, ...] = ()  # pinned wheels in /opt/dn
    files: tuple[tuple[str, str], ...] = ()
    size_mb: int = IMAGE_SIZE_MB
    version: int = RECIPE_VERSION

    def to_dict(self) -> dict:
        d = asdict(self)
        d["files"] = dict(self.files)
        return d

    @property
    def digest(self) -> str:
        # The mirror is where packages come from, not what they are: it is not in the digest
        # (the files include apt's sources.list, so it is in fact; a different mirror rebuilds).
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    @property
    def key(self) -> str:
        """The cache directory's name."""
        return self.digest[:16]


def recipe(mirror: str, python: Sequence[str]) -> Recipe:
    return Recipe(python=tuple(python), files=tuple(sorted(guest_files(mirror).items())))


# --------------------------------------------------------------------------------------------
# boot (pure argv builders)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Image:
    """A built image in the cache."""

    dir: Path

    @property
    def disk(self) -> Path:
        return self.dir / "rootfs.raw"

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def host_pub(self) -> Path:
        return self.dir / "ssh_host_ed25519_key.pub"

    @property
    def client_key(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def client_pub(self) -> Path:
        return self.dir / "id_ed25519.pub"

    @property
    def recipe_file(self) -> Path:
        return self.dir / "recipe.json"

    @property
    def complete(self) -> bool:
        return all(p.exists() for p in (self.disk, self.kernel, self.initrd, self.host_pub, self.client_key,
                                        self.recipe_file))


@dataclass(frozen=True)
class Run:
    """A running VM's files under :data:`VM_ROOT`."""

    dir: Path = VM_ROOT

    @property
    def overlay(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def pidfile(self) -> Path:
        return self.dir / "qemu.pid"

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    @property
    def qmp(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def state(self) -> Path:
        return self.dir / "state.json"


KERNEL_CMDLINE = "root=/dev/vda rw console=ttyS0 net.ifnames=0 systemd.show_status=0"


def qemu_argv(image: Image, run: Run, accel: str, *, qemu: str = QEMU) -> list[str]:
    """QEMU's command line for the VM: ``accel`` is ``kvm`` or ``tcg``."""
    if accel not in ("kvm", "tcg"):
        raise ValueError(f"accel must be kvm or tcg, not {accel!r}")
    return [
        qemu, "-name", HOSTNAME,
        "-machine", "q35", "-accel", "kvm" if accel == "kvm" else "tcg,thread=multi",
        "-cpu", "host" if accel == "kvm" else "max",
        "-smp", str(VCPUS), "-m", str(MEMORY_MB),
        "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", KERNEL_CMDLINE,
        "-drive", f"file={run.overlay},if=virtio,format=qcow2,cache=writeback,discard=unmap",
        "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=n0,mac={GUEST_MAC}",
        "-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=rng0",
        "-display", "none", "-monitor", "none",
        "-serial", f"file:{run.console}",
        "-qmp", f"unix:{run.qmp},server=on,wait=off",
        "-pidfile", str(run.pidfile), "-daemonize",
    ]


def probe_argv(image: Image, *, qemu: str = QEMU) -> list[str]:
    """A KVM probe: the kernel alone, no root disk; it prints its banner, panics, and QEMU exits."""
    return [qemu, "-accel", "kvm", "-cpu", "host", "-m", "256", "-kernel", str(image.kernel),
            "-append", "console=ttyS0 panic=-1", "-no-reboot", "-display", "none", "-monitor", "none",
            "-serial", "stdio", "-nodefaults"]


def overlay_argv(image: Image, run: Run) -> list[str]:
    return ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.disk), str(run.overlay)]


def known_hosts_line(host_pub: str, address: str = GUEST_ADDR) -> str:
    """The known_hosts line pinning ``host_pub`` (a .pub file's text) for ``address``."""
    parts = host_pub.split()
    if len(parts) < 2 or parts[0] != "ssh-ed25519":
        raise ValueError("not an ssh-ed25519 public key")
    return f"{address} {parts[0]} {parts[1]}\n"


# --------------------------------------------------------------------------------------------
# the configuration pointing dn at the VM host (pure)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientFiles:
    """dn's side of the VM host inside one data dir: ``<data_dir>/vm/``."""

    dir: Path

    @classmethod
    def of(cls, data_dir: Path) -> ClientFiles:
        return cls(Path(data_dir) / "vm")

    @property
    def key(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def config(self) -> Path:
        return self.dir / "config.toml"

    def all(self) -> tuple[Path, ...]:
        return (self.key, self.known_hosts, self.config)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(data: Mapping, _path: tuple[str, ...] = ()) -> str:
    """A small TOML writer for dn's configuration (tables of scalars and lists)."""
    lines, tables = [], []
    for k, v in data.items():
        if isinstance(v, Mapping):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {_toml_value(v)}")
    out = ""
    if lines:
        if _path:
            out += "[" + ".".join(json.dumps(p) if not re.fullmatch(r"[A-Za-z0-9_-]+", p) else p
                                  for p in _path) + "]\n"
        out += "\n".join(lines) + "\n\n"
    for k, v in tables:
        out += to_toml(v, (*_path, k))
    return out


def host_entry(files: ClientFiles) -> dict:
    """The VM host as a host of dn's configuration: the production layout (prefix ``/``)."""
    return {
        "address": GUEST_ADDR,
        "user": "root",
        "key_path": str(files.key),
        "known_hosts": str(files.known_hosts),
        "admin_sources": [f"{HOST_ADDR}/32"],
        "prefix": "/",
        "region": "eu-de-1",
        "dn_bin": DN_BIN,
    }


def vm_config(data_dir: Path) -> dict:
    """dn's configuration with the VM host as its default host: the embedded default (the netns
    sandbox's second region, database and secrets) plus the host :data:`HOST_NAME`."""
    from dn.config import embedded_default

    cfg = embedded_default(Path(data_dir))
    files = ClientFiles.of(Path(data_dir))
    cfg["hosts"][HOST_NAME] = host_entry(files)
    cfg["default_host"] = HOST_NAME
    return cfg


# --------------------------------------------------------------------------------------------
# process-running helpers
# --------------------------------------------------------------------------------------------
def _run(argv: Sequence[str], *, check: bool = True, input: bytes | None = None, timeout: float = 300,
         env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout,
                           env=env or DAEMON_ENV, cwd=cwd)
    except FileNotFoundError:
        raise OperationFailed(f"vm: {argv[0]} is not installed",
                              hint="apt-get install qemu-system-x86 qemu-utils debootstrap e2fsprogs") from None
    except subprocess.TimeoutExpired:
        raise OperationFailed(f"vm: `{' '.join(argv[:6])}...` did not finish within {timeout:g}s") from None
    if check and r.returncode != 0:
        err = (r.stderr or r.stdout).decode("utf-8", "replace").strip()[-1500:]
        raise OperationFailed(f"vm: `{' '.join(argv[:8])}` failed (exit {r.returncode}): {err}")
    return r


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME/dn/vm`` (``~/.cache/dn/vm``): built images, one directory per recipe."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dn" / "vm"


def machine_recipe() -> Recipe:
    """The recipe on this machine: its apt mirror and the pinned closure of dn's runtime
    dependencies (not whatever else the venv holds: test tools, linters)."""
    texts = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            texts.append(p.read_text())
        except OSError:
            pass
    return recipe(apt_mirror(texts), installed_requirements())


def preflight() -> None:
    """Every tool the VM needs, checked before anything is built or started."""
    if os.geteuid() != 0:
        raise OperationFailed("vm: needs root (debootstrap, tap device, QEMU)", hint="run as root")
    missing = [t for t in ("debootstrap", QEMU, "qemu-img", "mkfs.ext4", "debugfs", "ssh-keygen", "unshare",
                           "chroot", "ip")
               if not shutil.which(t, path=DAEMON_ENV["PATH"])]
    if missing:
        raise OperationFailed(f"vm: missing {', '.join(missing)}",
                              hint="apt-get install qemu-system-x86 qemu-utils debootstrap e2fsprogs (scripts/setup)")
    if not os.path.exists("/dev/net/tun"):
        raise OperationFailed("vm: /dev/net/tun is missing: no tap device can be made", hint="modprobe tun")


@contextmanager
def _locked(path: Path = LOCK_PATH, timeout: float = 1800) -> Iterator[None]:
    from dn.sandbox import flock_within

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if not flock_within(fd, timeout):
            raise Locked(f"vm: another run holds {path}", hint="wait for it to finish, then rerun")
        yield
    finally:
        os.close(fd)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    from dn.localfile import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, mode=mode)


# --------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------
POLICY_RC = b"#!/bin/sh\n# dn image build: no daemon starts inside the chroot\nexit 101\n"


def _chroot_script(root: Path, script: str, *, timeout: float, input: bytes | None = None) -> None:
    """Run ``script`` (sh) chrooted in ``root`` inside a private mount namespace: the /proc,
    /sys and /dev it mounts die with the namespace, whatever happens."""
    wrapper = (
        "set -e\n"
        f"R={_q(str(root))}\n"
        "mount -t proc proc \"$R/proc\"\n"
        "mount -t sysfs sys \"$R/sys\"\n"
        "mount --rbind /dev \"$R/dev\"\n"
        "mount --make-rslave \"$R/dev\"\n"
        "exec chroot \"$R\" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "
        "LANG=C.UTF-8 /bin/sh -ec \"$1\"\n"
    )
    _run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", wrapper, "dn-vm-build", script],
         timeout=timeout, input=input)


def _q(s: str) -> str:
    import shlex

    return shlex.quote(s)


def _wheels(rcp: Recipe, dest: Path, say: Progress) -> None:
    """Wheels of the recipe's Python pins for this machine's interpreter (== the guest's: both
    Debian 12, CPython 3.11), from the package index pip is configured with."""
    import sys

    dest.mkdir(parents=True, exist_ok=True)
    reqs = dest / "requirements.txt"
    reqs.write_text("\n".join(rcp.python) + "\n")
    say(f"wheels: {len(rcp.python)} pinned distributions")
    _run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps", "-d", str(dest),
          "-r", str(reqs)], timeout=900, env=dict(os.environ))  # pip's own configuration (index, CA) applies


def build(rcp: Recipe, *, cache: Path | None = None, mirror: str | None = None, progress: Progress = _quiet) -> Image:
    """The image of ``rcp``, built unless the cache already holds it. Idempotent; an
    interrupted build leaves only a ``.build-*`` directory, removed by the next build."""
    cache = cache or cache_dir()
    image = Image(cache / rcp.key)
    if image.complete:
        return image
    files = dict(rcp.files)
    if mirror is None:
        m = re.match(r"deb (\S+) ", files.get("/etc/apt/sources.list", ""))
        mirror = m.group(1) if m else DEFAULT_MIRROR
    cache.mkdir(parents=True, exist_ok=True)
    os.chmod(cache, 0o700)  # the client key of every image lives here
    with _locked(cache / "build.lock", timeout=3600):
        if image.complete:
            return image
        for old in cache.glob(".build-*"):
            shutil.rmtree(old, ignore_errors=True)
        work = cache / f".build-{rcp.key}"
        root = work / "root"
        work.mkdir(mode=0o700)
        started = time.monotonic()
        progress(f"debootstrap {rcp.suite} from {mirror} (minutes, once per recipe)")
        _run(["debootstrap", "--variant=minbase", rcp.suite, str(root), mirror], timeout=1800)
        progress(f"debootstrap done in {time.monotonic() - started:.0f}s")
        _write(root / "usr/sbin/policy-rc.d", POLICY_RC, 0o755)
        _write(root / "etc/resolv.conf", Path("/etc/resolv.conf").read_bytes(), 0o644)
        _write(root / "etc/apt/sources.list", files["/etc/apt/sources.list"].encode(), 0o644)
        t = time.monotonic()
        pkgs = " ".join(_q(p) for p in (*rcp.packages, *rcp.kernel))
        _chroot_script(root, "apt-get update -qq\n"
                             f"apt-get install -y -qq --no-install-recommends {pkgs} >/dev/null\n"
                             "apt-get clean\n", timeout=2400)
        progress(f"packages and kernel installed in {time.monotonic() - t:.0f}s")
        if rcp.python:
            t = time.monotonic()
            wheels = root / "tmp" / "wheels"
            _wheels(rcp, wheels, progress)
            _chroot_script(root, f"python3 -m venv {VENV}\n"
                                 f"{VENV}/bin/pip install -q --no-index --no-deps --find-links /tmp/wheels "
                                 "-r /tmp/wheels/requirements.txt\n", timeout=1200)
            shutil.rmtree(wheels)
            progress(f"python venv {VENV} ({len(rcp.python)} distributions) in {time.monotonic() - t:.0f}s")
        # The image's own files; the packages' daemons start at boot, not here.
        (root / "usr/sbin/policy-rc.d").unlink()
        for path, content in files.items():
            _write(root / path.lstrip("/"), content.encode(), 0o644)
        for old in (root / "etc/ssh").glob("ssh_host_*"):
            old.unlink()
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{HOSTNAME}",
              "-f", str(root / "etc/ssh/ssh_host_ed25519_key")])
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dn@vm-sandbox", "-f", str(work / "id_ed25519")])
        (root / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
        _write(root / "root/.ssh/authorized_keys", (work / "id_ed25519.pub").read_bytes(), 0o600)
        (root / "var/log/journal").mkdir(exist_ok=True)  # journald keeps the journal across reboots
        _chroot_script(root, "systemctl enable systemd-networkd ssh >/dev/null 2>&1\n"
                             # no console login prompt on the serial port needed; keep the getty
                             "rm -f /etc/machine-id && touch /etc/machine-id\n", timeout=120)
        boot = root / "boot"
        kernels = sorted(boot.glob("vmlinuz-*"))
        initrds = sorted(boot.glob("initrd.img-*"))
        if not kernels or not initrds:
            raise OperationFailed(f"vm: no kernel/initramfs in the image's /boot ({boot})")
        shutil.copyfile(kernels[-1], work / "vmlinuz")
        shutil.copyfile(initrds[-1], work / "initrd.img")
        shutil.copyfile(root / "etc/ssh/ssh_host_ed25519_key.pub", work / "ssh_host_ed25519_key.pub")
        t = time.monotonic()
        _run(["mkfs.ext4", "-q", "-F", "-L", "dn-root", "-E", "root_owner=0:0", "-d", str(root),
              str(work / "rootfs.raw"), f"{rcp.size_mb}M"], timeout=1200)
        progress(f"rootfs.raw packed in {time.monotonic() - t:.0f}s")
        _run(["rm", "-rf", "--one-file-system", str(root)], timeout=600)  # faster than shutil.rmtree
        _write(work / "recipe.json", (json.dumps(rcp.to_dict(), indent=2, sort_keys=True) + "\n").encode())
        os.rename(work, image.dir)
        progress(f"image {image.dir} built in {time.monotonic() - started:.0f}s")
        _prune(cache, keep={image.dir, Path(_load_state(Run()).get("image") or image.dir)})
    return image


def _prune(cache: Path, keep: set[Path]) -> None:
    """Remove images of older recipes (about 1.5 GB each), except those in ``keep`` (the new
    one, and the one a running VM's overlay is backed by)."""
    for d in cache.iterdir():
        if d.is_dir() and re.fullmatch(r"[0-9a-f]{16}", d.name) and d not in keep:
            _run(["rm", "-rf", "--one-file-system", str(d)], timeout=600)


def image_host_key(image: Image) -> str:
    """The SSH host public key read out of the image itself (debugfs: no mount, read-only)."""
    r = _run(["debugfs", "-R", "cat /etc/ssh/ssh_host_ed25519_key.pub", str(image.disk)], timeout=60)
    text = r.stdout.decode("utf-8", "replace").strip()
    if not text.startswith("ssh-ed25519 "):
        raise OperationFailed(f"vm: {image.disk} holds no ed25519 host key")
    return text


# --------------------------------------------------------------------------------------------
# boot, stop, status
# --------------------------------------------------------------------------------------------
def qemu_pid(run: Run = Run()) -> int | None:
    """The pid of the VM's QEMU if it runs (checked against its command line, not just the file)."""
    try:
        pid = int(run.pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if not pid_alive(pid) or not cmd or not cmd[0].endswith(QEMU.encode()) or str(run.pidfile).encode() not in cmd:
        return None
    return pid


def _load_state(run: Run) -> dict:
    try:
        return json.loads(run.state.read_text())
    except (OSError, ValueError):
        return {}


def _save_state(run: Run, state: dict) -> None:
    _write(run.state, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode())


def probe_kvm(image: Image, *, timeout: float = 20) -> tuple[bool, str]:
    """Whether a KVM guest really runs here: boot the kernel alone under KVM and wait for its
    banner on the serial port. ``/dev/kvm`` existing proves nothing (a KVM guest once printed
    nothing in 60 s on a machine whose /dev/kvm accepted KVM_CREATE_VM)."""
    if not os.path.exists("/dev/kvm"):
        return False, "no /dev/kvm"
    try:
        p = subprocess.Popen(probe_argv(image), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=DAEMON_ENV)
    except OSError as e:
        return False, f"qemu: {e.strerror}"
    os.set_blocking(p.stdout.fileno(), False)
    seen, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                chunk = p.stdout.read() or b""
            except BlockingIOError:
                chunk = b""
            seen += chunk
            if b"Linux version" in seen:
                return True, "a probe guest booted under KVM"
            if p.poll() is not None and not chunk:
                break
            time.sleep(0.2)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
    tail = seen.decode("utf-8", "replace").strip()[-200:]
    return False, f"a probe guest under KVM printed no kernel banner within {timeout:g}s" + (f" ({tail})" if tail else "")


def _ensure_tap(say: Progress) -> None:
    if not Path(f"/sys/class/net/{TAP}").exists():
        _run(["ip", "tuntap", "add", "dev", TAP, "mode", "tap"])
        say(f"tap {TAP}: created")
    _run(["ip", "addr", "replace", f"{HOST_ADDR}/{PREFIXLEN}", "dev", TAP])
    _run(["ip", "link", "set", TAP, "up"])


def _tcp_banner(address: str, port: int, expect: bytes, timeout: float = 10.0) -> bool:
    # generous: under TCG on a busy machine sshd may take seconds to send its banner
    try:
        with socket.create_connection((address, port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(64).startswith(expect)
    except OSError:
        return False


def _wait(predicate: Callable[[], bool], timeout: float, what: str, run: Run) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if qemu_pid(run) is None:
            break
        time.sleep(0.5)
    tail = run.console.read_text(errors="replace").strip()[-800:] if run.console.exists() else ""
    raise OperationFailed(f"vm: {what} within {timeout:g}s" + (f" — console tail: {tail}" if tail else ""))


def boot(image: Image, run: Run = Run(), *, progress: Progress = _quiet, ssh_timeout: float = 300) -> dict:
    """Start QEMU on ``image`` unless it runs already; wait for sshd's banner. Returns the state."""
    run.dir.mkdir(parents=True, exist_ok=True)
    os.chmod(run.dir, 0o700)
    state = _load_state(run)
    pid = qemu_pid(run)
    if pid and state.get("image") == str(image.dir):
        _wait(lambda: _tcp_banner(GUEST_ADDR, 22, b"SSH-"), ssh_timeout, "sshd did not answer", run)
        return state
    if pid:  # a VM of another image: its disk belongs to that image
        stop(run, progress=progress)
    if "accel" not in state or state.get("accel_image") != str(image.dir):
        ok, why = probe_kvm(image)
        state.update(accel="kvm" if ok else "tcg", accel_reason=why, accel_image=str(image.dir))
        progress(f"accelerator: {state['accel']} ({why})")
    if state.get("image") != str(image.dir) or not run.overlay.exists():
        run.overlay.unlink(missing_ok=True)
        _run(overlay_argv(image, run))
    _ensure_tap(progress)
    run.console.unlink(missing_ok=True)
    run.pidfile.unlink(missing_ok=True)
    started = time.monotonic()
    _run(qemu_argv(image, run, state["accel"]), timeout=60)
    state.update(image=str(image.dir), booted=time.time())
    _save_state(run, state)
    _wait(lambda: _tcp_banner(GUEST_ADDR, 22, b"SSH-"), ssh_timeout, "sshd did not answer", run)
    state["boot_seconds"] = round(time.monotonic() - started, 1)
    _save_state(run, state)
    progress(f"booted ({state['accel']}): sshd on {GUEST_ADDR}:22 after {state['boot_seconds']}s")
    return state


def _qmp(run: Run, command: str, timeout: float = 5) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(run.qmp))
            s.recv(4096)  # greeting
            s.sendall(b'{"execute":"qmp_capabilities"}\n')
            s.recv(4096)
            s.sendall(json.dumps({"execute": command}).encode() + b"\n")
            s.recv(4096)
        return True
    except OSError:
        return False


def stop(run: Run = Run(), *, progress: Progress = _quiet, grace: float = 0) -> bool:
    """Stop the VM: with ``grace``, an ACPI power-off first (waiting that long), then SIGTERM,
    then SIGKILL. Without (the default: every caller throws the disk overlay away), QEMU is
    simply ended. False when it was not running."""
    pid = qemu_pid(run)
    if pid is None:
        return False
    if grace > 0 and _qmp(run, "system_powerdown"):
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.5)
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if not pid_alive(pid):
            break
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.2)
    progress("qemu stopped")
    return True


# --------------------------------------------------------------------------------------------
# dn on the guest, and dn's client files
# --------------------------------------------------------------------------------------------
def _source_root() -> Path:
    return Path(__file__).resolve().parent.parent


def dn_tree(root: Path | None = None) -> tuple[bytes, str]:
    """dn's source tree (:data:`DN_TREE`) as a reproducible tar, and its digest."""
    root = root or _source_root()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for top in DN_TREE:
            paths = [root / top] if (root / top).is_file() else sorted(
                p for p in (root / top).rglob("*") if p.is_file() and "__pycache__" not in p.parts
                and not p.name.endswith(".pyc"))
            for p in paths:
                info = tarfile.TarInfo(str(p.relative_to(root)))
                data = p.read_bytes()
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def dn_launcher() -> str:
    """``/usr/local/bin/dn`` on the guest: dn's console script, run by the venv's Python."""
    return f"#!{VENV}/bin/python3\n# Managed by dn.\nimport sys\nfrom cli.main import run\nsys.exit(run())\n"


def deploy_dn(target, *, root: Path | None = None, progress: Progress = _quiet) -> tuple[bool, str]:
    """Install this dn (or the tree at ``root``) on the VM host (``/opt/dn/src``, on the venv's
    path, launched by ``/usr/local/bin/dn``), as one swap. Returns whether anything changed
    (False: the host already runs this tree) and the tree's digest."""
    from dn import ssh

    data, digest = dn_tree(root)
    with ssh.connect(target) as s:
        marker = f"{DN_SRC}.digest"
        if s.exists(marker) and s.read_file(marker).decode().strip() == digest and s.exists(DN_BIN):
            return False, digest
        new = f"{DN_SRC}.new"
        s.run(["rm", "-rf", new])
        s.run(["mkdir", "-p", new])
        s.run(["tar", "-x", "-C", new, "-f", "-"], stdin=data, timeout=300)
        site = s.run([f"{VENV}/bin/python3", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).text.strip()
        s.run(["sh", "-c", f"rm -rf {DN_SRC}.old; if [ -d {DN_SRC} ]; then mv {DN_SRC} {DN_SRC}.old; fi; "
                           f"mv {DN_SRC}.new {DN_SRC}; rm -rf {DN_SRC}.old"])
        s.install_file(f"{site}/dn-src.pth", (DN_SRC + "\n").encode(), mode=0o644)
        s.install_file(DN_BIN, dn_launcher().encode(), mode=0o755)
        s.run([DN_BIN, "--help"], timeout=300)  # it starts: imports resolve on the host
        s.install_file(marker, (digest + "\n").encode(), mode=0o644)
    progress(f"dn deployed to {DN_SRC} ({len(data) // 1024} KiB, {digest[:12]})")
    return True, digest


def settle(target, *, timeout: float = 900, progress: Progress = _quiet) -> str:
    """Wait until systemd has finished starting the machine (``is-system-running --wait``):
    until then Docker is still adding its iptables chains and PostgreSQL is starting, and an
    apply planned meanwhile finds the host changed under it. Returns the state (running, or
    degraded: ``systemctl --failed`` says why); raises if the machine is not up at all."""
    from dn import ssh

    with ssh.connect(target) as s:
        state = s.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=timeout).text.strip()
        if state not in ("running", "degraded"):
            raise OperationFailed(f"vm: systemd reports the machine {state or 'unknown'} after {timeout:g}s")
        if state == "degraded":
            failed = s.run(["systemctl", "--failed", "--no-legend", "--plain"], check=False).text.strip()
            progress(f"systemd: degraded ({' | '.join(failed.splitlines())})")
    return state


def write_client_files(data_dir: Path, image: Image) -> ClientFiles:
    """``<data_dir>/vm/``: dn's key, known_hosts pinned from the image, and the configuration
    file pointing dn at the VM host."""
    files = ClientFiles.of(Path(data_dir))
    files.dir.mkdir(parents=True, exist_ok=True)
    os.chmod(files.dir, 0o700)
    _write(files.key, image.client_key.read_bytes(), 0o600)
    pinned = image_host_key(image)
    if pinned.split()[:2] != image.host_pub.read_text().split()[:2]:
        raise OperationFailed(f"vm: the host key in {image.disk} is not the one generated at build time",
                              hint=f"remove {image.dir} and rerun `dn sandbox up --vm` to rebuild")
    _write(files.known_hosts, known_hosts_line(pinned).encode(), 0o644)
    _write(files.config, ("# dn's configuration for the VM sandbox host (written by `dn sandbox up --vm`).\n"
                          + to_toml(vm_config(Path(data_dir)))).encode(), 0o600)
    return files


def target(data_dir: Path):
    """The SSH target of the VM host for ``data_dir``."""
    from dn.config import HostConfig

    return HostConfig.model_validate(host_entry(ClientFiles.of(Path(data_dir))))


# --------------------------------------------------------------------------------------------
# up, down, status
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    name: str
    up: bool
    detail: str


def up(data_dir: Path, *, progress: Progress = _quiet) -> tuple[list[Part], Path]:
    """Build (cached) and boot the VM host, deploy dn onto it, write the data dir's client files.
    Returns the status afterwards and the configuration file's path."""
    preflight()
    rcp = machine_recipe()
    image = build(rcp, progress=progress)
    with _locked():
        boot(image, progress=progress)
        files = write_client_files(data_dir, image)
        settle(target(data_dir), progress=progress)
        deploy_dn(target(data_dir), progress=progress)
    parts = status(data_dir)
    down_parts = [p for p in parts if not p.up]
    if down_parts:
        raise OperationFailed("vm: not up after `up`: " + "; ".join(f"{p.name}: {p.detail}" for p in down_parts))
    return parts, files.config


def down(data_dir: Path | None = None, *, progress: Progress = _quiet) -> None:
    """Stop the VM and remove its disk overlay and tap device (the cached image stays), and the
    client files of ``data_dir``. The netns sandbox is not touched."""
    if os.geteuid() != 0:
        raise OperationFailed("vm: needs root", hint="run as root")
    run = Run()
    with _locked():
        stop(run, progress=progress)
        if Path(f"/sys/class/net/{TAP}").exists():
            _run(["ip", "link", "del", TAP], check=False)
        for p in (run.overlay, run.pidfile, run.qmp, run.console, run.state):
            p.unlink(missing_ok=True)
        try:
            run.dir.rmdir()
        except OSError:
            pass
        if data_dir is not None:
            files = ClientFiles.of(Path(data_dir))
            for f in files.all():
                f.unlink(missing_ok=True)
            try:
                files.dir.rmdir()
            except OSError:
                pass
        progress(f"vm stopped; {TAP} and the disk overlay removed")


def status(data_dir: Path | None = None, run: Run = Run()) -> list[Part]:
    """The VM host's parts (cheap: no SSH login)."""
    state = _load_state(run)
    pid = qemu_pid(run)
    parts = [Part("vm", pid is not None,
                  f"pid {pid}, {state.get('accel', '?')}, {VCPUS} vCPUs, {MEMORY_MB} MiB, image {state.get('image')}"
                  if pid else "not running")]
    link = Path(f"/sys/class/net/{TAP}")
    parts.append(Part("tap", link.exists(), f"{TAP} {HOST_ADDR}/{PREFIXLEN}" if link.exists() else f"{TAP} missing"))
    ssh_up = pid is not None and _tcp_banner(GUEST_ADDR, 22, b"SSH-")
    parts.append(Part("vm-sshd", ssh_up, f"{GUEST_ADDR}:22" if ssh_up else "not answering"))
    if data_dir is not None:
        files = ClientFiles.of(Path(data_dir))
        absent = [p.name for p in files.all() if not p.exists()]
        parts.append(Part("vm-client", not absent,
                          str(files.config) if not absent else f"missing in {files.dir}: {', '.join(absent)}"))
    return parts
