"""The sandbox EU host: a disposable copy of dn's production topology on this machine.

``up`` builds, idempotently and touching nothing beyond loopback and its own namespaces:

- netns ``dn-eu1`` (10.231.1.2; the root namespace side of the veth pair is 10.231.1.1): the EU
  host. It runs its own sshd (generated ed25519 host key, key-only root login), dockerd and nginx.
  Files dn manages on the host live under the host prefix ``/srv/dn-sandbox/eu1`` (a real host
  uses ``/``): ``etc/nginx/nginx.conf``, ``run/docker.sock``, ``var/lib/docker`` ...
- netns ``dn-eu2`` (10.231.2.2): the second region, an SFTP-only sshd for user ``backup`` jailed
  in ``/srv/dn-sandbox/eu2/chroot`` (SFTP path ``/backups``).
- the PostgreSQL cluster (dn.pgcluster) on 127.0.0.1:54329 under ``/srv/dn-sandbox/pg``.
- the image ``dn.local/sgtm-standin:1`` in the sandbox dockerd: busybox serving HTTP on 8080,
  ``/healthz`` -> 200; it stands in for the sGTM tagging and preview servers.
- per data dir, ``<data_dir>/sandbox/``: dn's client key pair ``id_ed25519``, ``known_hosts``
  written from the generated host keys (never learnt by connecting), ``passphrase`` (Pulumi
  state, 0600) and ``pgpass`` (0600). Several data dirs may share the one sandbox.

Decisions worth knowing:

- dockerd runs under ``nsenter --net`` (``ip netns exec`` remounts /sys and hides the cgroups),
  with its own data-root, exec-root, pidfile, cgroup parent ``dn-eu1`` and the socket
  ``/srv/dn-sandbox/eu1/run/docker.sock`` only; ``/var/run/docker.sock`` stays free for a
  machine-wide daemon. The eu1 sshd sets ``DOCKER_HOST`` for every session, so ``docker`` run
  over SSH (including ``docker system dial-stdio`` for pulumi-docker's ``ssh://`` host) finds it.
- Storage driver: overlay2 where an overlay mount works (it does on this machine's ext4 root),
  else vfs (works everywhere, slow and large). ``up`` probes once and records the choice.
- The netns has no default route: nothing inside it can reach beyond 10.231.1.0/24 and its
  own container networks (10.231.64.0/24 for docker0, pool 10.231.128.0/17).
- ``down`` removes the namespaces, every process in them (and in the ``dn-eu1`` cgroups), their
  mounts, the cgroup directories, the PostgreSQL cluster, ``/srv/dn-sandbox/{eu1,eu2,image}``,
  the ``sandbox/`` files of every registered data dir, and the run-time directories ``up`` had to
  create (``/run/netns`` and its mount, ``/run/sshd``, ``/run/docker``, ``/run/containerd``).
  It leaves the lock file ``/run/lock/dn-sandbox.lock``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import functools
import hashlib
import io
import json
import os
import sys
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from dn.config import (
    SANDBOX_EU1_ADDR,
    SANDBOX_EU1_GW,
    SANDBOX_EU2_ADDR,
    SANDBOX_EU2_GW,
    SANDBOX_PG_PORT,
    SANDBOX_ROOT,
)
from dn.errors import Locked, OperationFailed
from dn.localfile import write_atomic
from dn.pgcluster import Cluster

ROOT = Path(SANDBOX_ROOT)
TEMPLATES = Path(__file__).resolve().parent.parent / "templates" / "sandbox"
LOCK_PATH = Path("/run/lock/dn-sandbox.lock")
STATE_PATH = ROOT / "state.json"
PG_ROOT = ROOT / "pg"
IMAGE_DIR = ROOT / "image"
IMAGE = "dn.local/sgtm-standin:1"
IMAGE_DIGEST_LABEL = "dn.sandbox.standin.digest"
CGROUP_PARENT = "dn-eu1"
DOCKER_BIP = "10.231.64.1/24"
DOCKER_POOL = "10.231.128.0/17"
BACKUP_USER = "backup"
# Directories outside ROOT that the daemons need; ``down`` removes those ``up`` had to create.
RUNTIME_DIRS = ("/run/netns", "/run/sshd", "/run/docker/plugins", "/run/docker", "/run/containerd/s",
                "/run/containerd")
SSHD = "/usr/sbin/sshd"
DOCKERD = "/usr/sbin/dockerd"
NGINX = "/usr/sbin/nginx"
BUSYBOX = "/bin/busybox"
# Daemons get a clean environment: nothing of the caller's (passphrases included) leaks into them.
DAEMON_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
STANDIN_APPLETS = ("sh", "nc", "head", "tr", "printf", "cat", "echo", "hostname", "wget", "sleep", "kill",
                   "env", "ls", "id", "true", "false", "test", "[")

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class Region:
    """One sandbox machine: a network namespace and its files under ``ROOT/<name>``."""

    name: str
    netns: str
    address: str
    gateway: str

    @property
    def prefix(self) -> Path:
        return ROOT / self.name

    @property
    def veth(self) -> str:
        return self.netns  # the root-namespace end of the veth pair

    def p(self, rel: str) -> Path:
        return self.prefix / rel

    @property
    def sshd_config(self) -> Path:
        return self.p("etc/ssh/sshd_config")

    @property
    def host_key(self) -> Path:
        return self.p("etc/ssh/ssh_host_ed25519_key")

    @property
    def sshd_pid(self) -> Path:
        return self.p("run/sshd.pid")


EU1 = Region("eu1", "dn-eu1", SANDBOX_EU1_ADDR, SANDBOX_EU1_GW)
EU2 = Region("eu2", "dn-eu2", SANDBOX_EU2_ADDR, SANDBOX_EU2_GW)
REGIONS = (EU1, EU2)
DOCKER_SOCK = EU1.p("run/docker.sock")
DOCKER_HOST = f"unix://{DOCKER_SOCK}"
NGINX_CONF = EU1.p("etc/nginx/nginx.conf")
NGINX_PID = EU1.p("run/nginx.pid")
EU2_CHROOT = EU2.p("chroot")


@dataclass(frozen=True)
class ClientFiles:
    """dn's side of the sandbox inside one data dir."""

    dir: Path

    @classmethod
    def of(cls, data_dir: Path) -> "ClientFiles":
        return cls(Path(data_dir) / "sandbox")

    @property
    def key(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def pub(self) -> Path:
        return self.dir / "id_ed25519.pub"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def passphrase(self) -> Path:
        return self.dir / "passphrase"

    @property
    def pgpass(self) -> Path:
        return self.dir / "pgpass"

    def all(self) -> tuple[Path, ...]:
        return (self.key, self.pub, self.known_hosts, self.passphrase, self.pgpass)


def cluster(data_dir: Path) -> Cluster:
    """The sandbox PostgreSQL cluster, with the passfile of ``data_dir``."""
    return Cluster(PG_ROOT, SANDBOX_PG_PORT, ClientFiles.of(data_dir).pgpass)


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _run(argv: Sequence[str], *, check: bool = True, input: bytes | None = None, timeout: float = 120,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout,
                           env=env or DAEMON_ENV)
    except FileNotFoundError:
        raise OperationFailed(f"sandbox: {argv[0]} is not installed",
                              hint="apt-get install iproute2 openssh-server docker.io nginx busybox-static postgresql") from None
    except subprocess.TimeoutExpired:
        raise OperationFailed(f"sandbox: `{' '.join(argv)}` did not finish within {timeout:g}s") from None
    if check and r.returncode != 0:
        err = (r.stderr or r.stdout).decode("utf-8", "replace").strip()[-800:]
        raise OperationFailed(f"sandbox: `{' '.join(argv)}` failed (exit {r.returncode}): {err}")
    return r


def ns_exec(argv: Sequence[str], *, netns: str = EU1.netns, check: bool = True, input: bytes | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``argv`` as root inside a sandbox namespace (bytes output)."""
    return _run(["ip", "netns", "exec", netns, *argv], check=check, input=input, timeout=timeout)


def docker_cli(argv: Sequence[str], *, check: bool = True, input: bytes | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the docker CLI against the sandbox daemon, from this (root) namespace."""
    exe = shutil.which("docker", path=DAEMON_ENV["PATH"])
    if not exe:
        raise OperationFailed("sandbox: the docker CLI is not installed", hint="apt-get install docker.io")
    return _run([exe, *argv], check=check, input=input, timeout=timeout, env={**DAEMON_ENV, "DOCKER_HOST": DOCKER_HOST})


def _write_if_changed(path: Path, data: bytes, mode: int = 0o644) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_bytes() == data and (path.stat().st_mode & 0o7777) == mode:
        return False
    write_atomic(path, data, mode=mode)
    return True


def _render(name: str, **values) -> bytes:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), undefined=StrictUndefined,
                      keep_trailing_newline=True, autoescape=False)
    return env.get_template(name).render(**values).encode()


def _wait(predicate: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    tail = ""
    if log and log.exists():
        tail = " — log tail: " + log.read_text(errors="replace").strip()[-600:]
    raise OperationFailed(f"sandbox: {what} within {timeout:g}s{tail}")


def _mountpoints() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # field 5 is the mount point, with spaces etc. escaped as octal
            points.append(line.split()[4].encode().decode("unicode_escape"))
    return points


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


# mount(2)/umount2(2) directly: util-linux mount/umount would leave /run/mount/utab behind.
def _mount(source: str, target: str, fstype: str, options: str) -> bool:
    return _libc().mount(source.encode(), target.encode(), fstype.encode(), 0, options.encode()) == 0


def _umount(path: str) -> None:
    libc = _libc()
    if libc.umount2(path.encode(), 0) != 0:
        libc.umount2(path.encode(), 2)  # MNT_DETACH: lazily, once no longer busy


# -- processes ---------------------------------------------------------------------------------
def _netns_ino(name: str) -> int | None:
    """The inode of a live named netns, or None (missing, or a stale file that is not nsfs)."""
    path = Path("/run/netns") / name
    try:
        st = path.stat()
    except OSError:
        return None
    if st.st_dev != os.stat("/proc/self/ns/net").st_dev:
        return None
    return st.st_ino


def _proc_netns(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _proc_exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _daemon_pid(pidfile: Path, exe: str, netns: str | None) -> int | None:
    """The pid in ``pidfile`` if it is a live ``exe`` in ``netns``; a stale pid file gives None."""
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if not pid_alive(pid) or _proc_exe(pid) != exe:
        return None
    if netns is not None:
        ino = _netns_ino(netns)
        if ino is None or _proc_netns(pid) != ino:
            return None
    return pid


def _stop(pid: int, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def sandbox_processes() -> list[int]:
    """Pids of every process that belongs to the sandbox: inside its namespaces, in the docker
    cgroups of eu1 (the containers), or the PostgreSQL server of the sandbox cluster."""
    inos = {i for i in (_netns_ino(r.netns) for r in REGIONS) if i is not None}
    mine = _ancestors()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid in mine or not pid_alive(pid):
            continue
        if _proc_netns(pid) in inos:
            found.append(pid)
            continue
        try:
            cgroups = Path(f"/proc/{pid}/cgroup").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if any(line.split(":", 2)[-1].startswith(f"/{CGROUP_PARENT}") for line in cgroups.splitlines()):
            found.append(pid)
        elif (_proc_exe(pid) or "").endswith("/postgres") and str(PG_ROOT).encode() in cmdline:
            found.append(pid)
    return found


# -- docker API (just enough for status: ping and image inspect) --------------------------------
def _docker_get(path: str, timeout: float = 3.0) -> tuple[int, bytes] | None:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(DOCKER_SOCK))
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n".encode())
            chunks = []
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
    except OSError:
        return None
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    try:
        return int(head.split(b" ", 2)[1]), body
    except (IndexError, ValueError):
        return None


def _docker_up() -> bool:
    r = _docker_get("/_ping")
    return r is not None and r[0] == 200


def _image_digest() -> str | None:
    r = _docker_get(f"/images/{IMAGE}/json")
    if r is None or r[0] != 200:
        return None
    labels = (json.loads(r[1]).get("Config") or {}).get("Labels") or {}
    return labels.get(IMAGE_DIGEST_LABEL)


def _tcp_banner(address: str, port: int, expect: bytes, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout) as s:
            return s.recv(64).startswith(expect) if expect else True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# state and lock
# --------------------------------------------------------------------------------------------
def flock_within(fd, timeout: float, poll: float = 0.2) -> bool:
    """Take an exclusive flock on ``fd`` (a descriptor or file), waiting up to ``timeout`` s;
    False when another holder kept it that long. The sandbox's users (dn sandbox, test sessions)
    coordinate with it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(poll)


@contextmanager
def _locked(timeout: float = 600) -> Iterator[None]:
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if not flock_within(fd, timeout):
            raise Locked(f"sandbox: another `dn sandbox` run holds {LOCK_PATH}",
                         hint="wait for it to finish, then rerun")
        yield
    finally:
        os.close(fd)


def _load_state() -> dict:
    try:
        return json.loads(STATE_PATH.read_text())
    except (OSError, ValueError):
        return {}


def _save_state(state: dict) -> None:
    _write_if_changed(STATE_PATH, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode(), 0o644)


# --------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    name: str
    up: bool
    detail: str


def status(data_dir: Path | None = None) -> list[Part]:
    """The state of each part of the sandbox (cheap: no SSH login, no container started)."""
    parts = []
    missing = [r.netns for r in REGIONS if _netns_ino(r.netns) is None]
    links = [r.veth for r in REGIONS if not Path(f"/sys/class/net/{r.veth}").exists()]
    parts.append(Part("netns", not missing and not links,
                      "dn-eu1 and dn-eu2 with their veth pairs" if not missing and not links
                      else f"missing: {', '.join(missing + [f'link {n}' for n in links])}"))
    sshd = _daemon_pid(EU1.sshd_pid, SSHD, EU1.netns)
    parts.append(Part("sshd", bool(sshd) and _tcp_banner(EU1.address, 22, b"SSH-"),
                      f"pid {sshd} on {EU1.address}:22" if sshd else "not running"))
    dockerd = _daemon_pid(EU1.p("run/docker.pid"), DOCKERD, EU1.netns)
    parts.append(Part("dockerd", bool(dockerd) and _docker_up(),
                      f"pid {dockerd}, {DOCKER_HOST}" if dockerd else "not running"))
    nginx = _daemon_pid(NGINX_PID, NGINX, EU1.netns)
    parts.append(Part("nginx", bool(nginx), f"pid {nginx}, {NGINX_CONF}" if nginx else "not running"))
    eu2 = _daemon_pid(EU2.sshd_pid, SSHD, EU2.netns)
    parts.append(Part("second-region", bool(eu2) and _tcp_banner(EU2.address, 22, b"SSH-"),
                      f"sftp for {BACKUP_USER} on {EU2.address}:22" if eu2 else "not running"))
    pg_up = (PG_ROOT / "data" / "PG_VERSION").exists() and _tcp_banner("127.0.0.1", SANDBOX_PG_PORT, b"")
    parts.append(Part("postgresql", pg_up, f"127.0.0.1:{SANDBOX_PG_PORT}" if pg_up else "not running"))
    digest = _image_digest() if parts[2].up else None
    parts.append(Part("image", digest == _standin()[1] if digest else False,
                      IMAGE if digest == _standin()[1] else ("outdated" if digest else "missing")))
    if data_dir is not None:
        files = ClientFiles.of(data_dir)
        absent = [p.name for p in files.all() if not p.exists()]
        parts.append(Part("client", not absent, str(files.dir) if not absent else f"missing in {files.dir}: {', '.join(absent)}"))
    return parts


def status_json(parts: list[Part]) -> dict:
    """``{"up": bool, "parts": {name: {"up": bool, "detail": str}}}``"""
    return {"up": all(p.up for p in parts),
            "parts": {p.name: {k: v for k, v in asdict(p).items() if k != "name"} for p in parts}}


# --------------------------------------------------------------------------------------------
# up
# --------------------------------------------------------------------------------------------
def _preflight() -> None:
    if os.geteuid() != 0:
        raise OperationFailed("sandbox: needs root (network namespaces, daemons)", hint="run as root")
    for exe in (SSHD, DOCKERD, NGINX, BUSYBOX, "/usr/bin/ssh-keygen"):
        if not os.access(exe, os.X_OK):
            raise OperationFailed(f"sandbox: {exe} is missing",
                                  hint="apt-get install openssh-server docker.io nginx busybox-static")
    for tool in ("ip", "nsenter", "setsid", "containerd", "runc"):
        if not shutil.which(tool, path=DAEMON_ENV["PATH"]):
            raise OperationFailed(f"sandbox: {tool} is missing", hint="apt-get install iproute2 util-linux docker.io")


def _ensure_netns(r: Region, say: Progress) -> None:
    path = Path("/run/netns") / r.netns
    if _netns_ino(r.netns) is None:
        if path.exists():  # a leftover file with no namespace behind it
            _run(["ip", "netns", "del", r.netns], check=False)
            path.unlink(missing_ok=True)
        _run(["ip", "netns", "add", r.netns])
        say(f"netns {r.netns}: created")
    if not Path(f"/sys/class/net/{r.veth}").exists():
        _run(["ip", "-n", r.netns, "link", "del", "eth0"], check=False)  # half of an old pair
        _run(["ip", "link", "add", r.veth, "type", "veth", "peer", "name", "eth0", "netns", r.netns])
        say(f"netns {r.netns}: veth {r.veth} <-> eth0")
    _run(["ip", "addr", "replace", f"{r.gateway}/24", "dev", r.veth])
    _run(["ip", "link", "set", r.veth, "up"])
    _run(["ip", "-n", r.netns, "addr", "replace", f"{r.address}/24", "dev", "eth0"])
    _run(["ip", "-n", r.netns, "link", "set", "eth0", "up"])
    _run(["ip", "-n", r.netns, "link", "set", "lo", "up"])


def _keygen(path: Path, comment: str) -> None:
    if path.exists() and path.with_name(path.name + ".pub").exists():
        return
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".pub").unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    os.chmod(path, 0o600)


def _ensure_client(files: ClientFiles) -> None:
    files.dir.mkdir(parents=True, exist_ok=True)
    os.chmod(files.dir, 0o700)
    _keygen(files.key, "dn@sandbox")
    if not files.passphrase.exists():
        _write_if_changed(files.passphrase, (secrets.token_urlsafe(32) + "\n").encode(), 0o600)


def _ensure_sshd(r: Region, config: bytes, say: Progress) -> None:
    for d in ("etc/ssh/authorized_keys", "run", "var/log"):
        r.p(d).mkdir(parents=True, exist_ok=True)
    changed = _write_if_changed(r.sshd_config, config, 0o600)
    pid = _daemon_pid(r.sshd_pid, SSHD, r.netns)
    if pid and not changed and _tcp_banner(r.address, 22, b"SSH-"):
        return
    if pid:
        _stop(pid)  # listener only: open sessions keep running until they end
    r.sshd_pid.unlink(missing_ok=True)
    _run([SSHD, "-t", "-f", str(r.sshd_config)])
    log = r.p("var/log/sshd.log")
    ns_exec([SSHD, "-f", str(r.sshd_config), "-E", str(log)], netns=r.netns)
    _wait(lambda: _daemon_pid(r.sshd_pid, SSHD, r.netns) is not None and _tcp_banner(r.address, 22, b"SSH-"),
          15, f"sshd in {r.netns} did not start", log)
    say(f"sshd {r.name}: listening on {r.address}:22")


def _storage_driver(state: dict) -> str:
    if state.get("storage_driver"):
        return state["storage_driver"]
    probe = ROOT / "overlay-probe"
    dirs = {n: probe / n for n in ("lower", "upper", "work", "merged")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
    works = _mount("overlay", str(dirs["merged"]), "overlay", opts)
    if works:
        _umount(str(dirs["merged"]))
    shutil.rmtree(probe, ignore_errors=True)
    driver = "overlay2" if works else "vfs"
    state["storage_driver"] = driver
    return driver


def _ensure_dockerd(driver: str, say: Progress) -> None:
    for d in ("etc/docker", "run", "var/lib/docker", "var/log"):
        EU1.p(d).mkdir(parents=True, exist_ok=True)
    cfg = EU1.p("etc/docker/daemon.json")
    changed = _write_if_changed(cfg, _render("daemon.json.j2", prefix=EU1.prefix, storage_driver=driver,
                                             cgroup_parent=CGROUP_PARENT, bip=DOCKER_BIP,
                                             address_pool=DOCKER_POOL), 0o644)
    pidfile = EU1.p("run/docker.pid")
    pid = _daemon_pid(pidfile, DOCKERD, EU1.netns)
    if pid and not changed and _docker_up():
        return
    if pid:
        _stop(pid, timeout=60)
    # Leftovers of a daemon that died hard: its containerd, a stale pid file.
    inos = _netns_ino(EU1.netns)
    for p in sandbox_processes():
        if _proc_netns(p) == inos and (_proc_exe(p) or "").endswith(("/containerd", "/dockerd")):
            _stop(p, timeout=10)
    pidfile.unlink(missing_ok=True)
    log = EU1.p("var/log/dockerd.log")
    with open(log, "ab") as out:
        subprocess.run(["setsid", "-f", "nsenter", f"--net=/run/netns/{EU1.netns}", DOCKERD, "--config-file", str(cfg)],
                       stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=DAEMON_ENV, check=True)
    _wait(lambda: _docker_up() and _daemon_pid(pidfile, DOCKERD, EU1.netns) is not None, 90,
          "dockerd in dn-eu1 did not start", log)
    say(f"dockerd: {DOCKER_HOST} (storage driver {driver})")


def _ensure_nginx(say: Progress) -> None:
    for d in ("etc/nginx/conf.d", "run", "var/log/nginx", "var/lib/nginx"):
        EU1.p(d).mkdir(parents=True, exist_ok=True)
    errlog = str(EU1.p("var/log/nginx/error.log"))
    test = [NGINX, "-t", "-q", "-c", str(NGINX_CONF), "-e", errlog]
    if not NGINX_CONF.exists():
        _write_if_changed(NGINX_CONF, _render("nginx.conf.j2", prefix=EU1.prefix), 0o644)
        say(f"nginx: bootstrap configuration {NGINX_CONF}")
    elif not _daemon_pid(NGINX_PID, NGINX, EU1.netns) and _run(test, check=False).returncode != 0:
        # A stopped sandbox whose config no longer loads (a file it includes is gone): nginx
        # could never start on it. The sandbox is disposable: keep the broken file for reading,
        # start from the bootstrap config; `dn host up` renders dn's base config again.
        kept = NGINX_CONF.with_name(f"nginx.conf.broken-{int(time.time())}")
        NGINX_CONF.rename(kept)
        _write_if_changed(NGINX_CONF, _render("nginx.conf.j2", prefix=EU1.prefix), 0o644)
        say(f"nginx: {kept.name} did not pass `nginx -t`; bootstrap configuration {NGINX_CONF}")
    if _daemon_pid(NGINX_PID, NGINX, EU1.netns):
        return
    # Workers outlive a master that was killed, and keep its ports.
    ino = _netns_ino(EU1.netns)
    for p in sandbox_processes():
        if _proc_netns(p) == ino and _proc_exe(p) == NGINX:
            _stop(p, signal.SIGKILL, timeout=5)
    NGINX_PID.unlink(missing_ok=True)
    _run(test)
    ns_exec([NGINX, "-c", str(NGINX_CONF), "-e", errlog])
    _wait(lambda: _daemon_pid(NGINX_PID, NGINX, EU1.netns) is not None, 10, "nginx in dn-eu1 did not start",
          Path(errlog))
    say("nginx: running in dn-eu1")


def _ensure_chroot() -> None:
    try:
        pw = pwd.getpwnam(BACKUP_USER)
    except KeyError:
        raise OperationFailed(f"sandbox: the OS user {BACKUP_USER!r} is missing",
                              hint=f"useradd --system --shell /usr/sbin/nologin {BACKUP_USER}") from None
    # sshd's ChrootDirectory: every component root-owned and writable by root only.
    for d in (ROOT, EU2.prefix, EU2_CHROOT):
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, 0, 0)
        os.chmod(d, 0o755)
    backups = EU2_CHROOT / "backups"
    backups.mkdir(exist_ok=True)
    os.chown(backups, pw.pw_uid, pw.pw_gid)
    os.chmod(backups, 0o700)


@functools.lru_cache(maxsize=1)
def _standin() -> tuple[bytes, str]:
    """The stand-in image's root filesystem as a reproducible tar, and its digest."""
    buf = io.BytesIO()

    def add(name: str, *, data: bytes | None = None, mode: int = 0o644, link: str | None = None,
            kind: bytes = tarfile.REGTYPE) -> None:
        info = tarfile.TarInfo(name)
        info.mtime, info.uid, info.gid, info.mode, info.type = 0, 0, 0, mode, kind
        if link is not None:
            info.type, info.linkname = tarfile.SYMTYPE, link
        info.size = len(data) if data is not None else 0
        tar.addfile(info, io.BytesIO(data) if data is not None else None)

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for d in ("bin", "etc", "srv", "srv/standin"):
            add(d, mode=0o755, kind=tarfile.DIRTYPE)
        add("tmp", mode=0o1777, kind=tarfile.DIRTYPE)
        add("bin/busybox", data=Path(BUSYBOX).read_bytes(), mode=0o755)
        for applet in STANDIN_APPLETS:
            add(f"bin/{applet}", link="busybox")
        add("etc/passwd", data=b"root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        add("etc/group", data=b"root:x:0:\nnogroup:x:65534:\n")
        for script in ("run.sh", "handler.sh"):
            add(f"srv/standin/{script}", data=(TEMPLATES / "standin" / script).read_bytes(), mode=0o755)
    data = buf.getvalue()
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


def _ensure_image(say: Progress) -> None:
    data, digest = _standin()
    if _image_digest() == digest:
        return
    changes = [
        'ENTRYPOINT ["/bin/sh", "/srv/standin/run.sh"]',
        "ENV PORT=8080",
        "EXPOSE 8080",
        "USER 65534:65534",
        "WORKDIR /",
        f"LABEL {IMAGE_DIGEST_LABEL}={digest}",
        'HEALTHCHECK --interval=10s --timeout=3s CMD ["/bin/wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8080/healthz"]',
    ]
    argv = ["import"]
    for c in changes:
        argv += ["--change", c]
    docker_cli([*argv, "-", IMAGE], input=data)
    say(f"image {IMAGE}: imported ({len(data) // 1024} KiB rootfs from busybox-static)")


def _ensure_pg(files: ClientFiles, data_dirs: list[str], say: Progress) -> None:
    others = [ClientFiles.of(Path(d)).pgpass for d in data_dirs if Path(d) != files.dir.parent]
    if (PG_ROOT / "data" / "PG_VERSION").exists() and not files.pgpass.exists():
        # The cluster exists for another data dir: share its passwords rather than rotate them.
        for other in others:
            if other.exists():
                _write_if_changed(files.pgpass, other.read_bytes(), 0o600)
                break
    fresh = not (PG_ROOT / "data" / "PG_VERSION").exists()
    pg = Cluster(PG_ROOT, SANDBOX_PG_PORT, files.pgpass).ensure()
    # What a DBA does once on a real database: the NOLOGIN roles dn's grants name (dn db init
    # runs as the owner, which may not create roles).
    from dn import db

    db.bootstrap_roles(pg.dsn("postgres", "dn"), files.pgpass, owner="dn_owner", app_login="dn")
    content = files.pgpass.read_bytes()
    for other in others:  # every registered data dir keeps working passwords
        if other.parent.exists():
            _write_if_changed(other, content, 0o600)
    if fresh:
        say(f"postgresql: cluster created on 127.0.0.1:{SANDBOX_PG_PORT}")


def up(data_dir: Path, *, embedded: bool = False, progress: Progress = _quiet) -> list[Part]:
    """Create or repair the sandbox for ``data_dir``; idempotent and quick when already up.

    ``embedded``: ``data_dir`` runs on the embedded default, so everything dn records in it
    describes this sandbox; ``down`` sets those records aside (:data:`SANDBOX_RECORDS`).
    Returns the status afterwards. Raises OperationFailed naming the part that did not come up.
    """
    _preflight()
    data_dir = Path(data_dir).resolve()
    files = ClientFiles.of(data_dir)
    with _locked():
        ROOT.mkdir(parents=True, exist_ok=True)
        state = _load_state()
        if "preexisting" not in state:
            mounts = set(_mountpoints())
            state["preexisting"] = {d: os.path.exists(d) for d in RUNTIME_DIRS}
            state["netns_mount_preexisting"] = "/run/netns" in mounts
        data_dirs = state.setdefault("data_dirs", [])
        if str(data_dir) not in data_dirs:
            data_dirs.append(str(data_dir))
        data_dirs[:] = [d for d in data_dirs if Path(d).exists() or d == str(data_dir)]
        embedded_dirs = set(state.get("embedded_data_dirs", [])) & set(data_dirs)
        (embedded_dirs.add if embedded else embedded_dirs.discard)(str(data_dir))
        state["embedded_data_dirs"] = sorted(embedded_dirs)
        _save_state(state)

        _ensure_client(files)
        for r in REGIONS:
            _ensure_netns(r, progress)
            _keygen(r.host_key, f"dn-sandbox-{r.name}")
        pubs = []
        for d in data_dirs:
            pub = ClientFiles.of(Path(d)).pub
            if pub.exists():
                pubs.append(pub.read_text().strip())
        authorized = ("\n".join(dict.fromkeys(pubs)) + "\n").encode()
        _write_if_changed(EU1.p("etc/ssh/authorized_keys/root"), authorized, 0o644)
        _write_if_changed(EU2.p("etc/ssh/authorized_keys") / BACKUP_USER, authorized, 0o644)
        known = "".join(f"{r.address} {r.host_key.with_name(r.host_key.name + '.pub').read_text().strip()}\n"
                        for r in REGIONS).encode()
        for d in data_dirs:
            cf = ClientFiles.of(Path(d))
            if cf.dir.exists():
                _write_if_changed(cf.known_hosts, known, 0o644)

        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        _ensure_sshd(EU1, _render("sshd_eu1.conf.j2", region=EU1.name, netns=EU1.netns, address=EU1.address,
                                  prefix=EU1.prefix), progress)
        _ensure_chroot()
        _ensure_sshd(EU2, _render("sshd_eu2.conf.j2", region=EU2.name, netns=EU2.netns, address=EU2.address,
                                  prefix=EU2.prefix, chroot=EU2_CHROOT), progress)
        driver = _storage_driver(state)
        _save_state(state)
        _ensure_dockerd(driver, progress)
        _ensure_nginx(progress)
        _ensure_pg(files, data_dirs, progress)
        _ensure_image(progress)
        _ensure_host_dn(progress)
    parts = status(data_dir)
    down_parts = [p for p in parts if not p.up]
    if down_parts:
        raise OperationFailed("sandbox: not up after `up`: " + "; ".join(f"{p.name}: {p.detail}" for p in down_parts))
    return parts


HOST_DN = Path("/usr/local/bin/dn")


def _ensure_host_dn(say: Progress) -> None:
    """dn where a real host has it (HostBaseline.dn_bin): the sandbox host shares this machine's
    filesystem, and the timers dn renders run it (systemd-analyze verify checks that it exists)."""
    if HOST_DN.exists() and os.access(HOST_DN, os.X_OK):
        return
    target = Path(sys.executable).parent / "dn"
    if not target.exists():
        return  # not running from an installed dn: nothing to point at
    if HOST_DN.is_symlink():  # a dangling link from an earlier checkout
        HOST_DN.unlink()
    HOST_DN.symlink_to(target)
    say(f"host dn: {HOST_DN} -> {target}")


# --------------------------------------------------------------------------------------------
# down
# --------------------------------------------------------------------------------------------
def _remove_cgroups() -> None:
    base = Path("/sys/fs/cgroup")
    if not base.exists():
        return
    targets = [p for p in base.glob(f"*/{CGROUP_PARENT}") if p.is_dir()]
    targets += [p for p in base.glob(CGROUP_PARENT) if p.is_dir()]  # cgroup v2 unified at the root
    for top in targets:
        for _ in range(50):  # a cgroup can be removed only once the kernel has reaped its tasks
            for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                try:
                    d.rmdir()
                except OSError:
                    pass
            try:
                top.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


# What dn records in a data dir about the world its settings point at. On the embedded default
# that world is this sandbox, and `down` destroys it (hosts, second region, database): stack
# state describing resources that are gone, an audit witness of a log that is gone, backup keys of
# backups that are gone. Left in place they would make the next `up` inconsistent (a state
# passphrase that no longer exists, a witness that reports the new log as tampered).
SANDBOX_RECORDS = ("state", "stacks", "audit", "backup-keys", "dr", "evidence", "health", "ssh", "gdpr")
RESET_PREFIX = "sandbox-reset-"


def set_aside_records(data_dir: Path) -> Path | None:
    """Move ``data_dir``'s records of the sandbox world (:data:`SANDBOX_RECORDS`) and its state
    passphrase into ``<data_dir>/sandbox-reset-<UTC time>/`` (the previous such folder is
    removed); None when there is nothing to move. Tool caches (pulumi-home, policy launchers) stay."""
    present = [data_dir / n for n in SANDBOX_RECORDS if (data_dir / n).exists()]
    passphrase = ClientFiles.of(data_dir).passphrase
    if not present and not passphrase.exists():
        return None
    for old in data_dir.glob(RESET_PREFIX + "*"):
        shutil.rmtree(old, ignore_errors=True)
    dest = data_dir / (RESET_PREFIX + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    dest.mkdir(mode=0o700)
    for p in present:
        os.rename(p, dest / p.name)
    if passphrase.exists():  # the moved state stays readable with it
        os.rename(passphrase, dest / passphrase.name)
    return dest


def down(*, progress: Progress = _quiet) -> None:
    """Remove everything ``up`` made: processes, namespaces, mounts, cgroups, files."""
    if os.geteuid() != 0:
        raise OperationFailed("sandbox: needs root (network namespaces, daemons)", hint="run as root")
    with _locked():
        state = _load_state()
        nginx = _daemon_pid(NGINX_PID, NGINX, EU1.netns)
        if nginx:
            _stop(nginx, signal.SIGQUIT, timeout=10)
        dockerd = _daemon_pid(EU1.p("run/docker.pid"), DOCKERD, EU1.netns)
        if dockerd:
            _stop(dockerd, timeout=60)  # stops the containers and unmounts their filesystems
        for r in REGIONS:
            pid = _daemon_pid(r.sshd_pid, SSHD, r.netns)
            if pid:
                _stop(pid, timeout=10)
        for pid in sandbox_processes():
            if not (_proc_exe(pid) or "").endswith("/postgres"):
                _stop(pid, signal.SIGKILL, timeout=5)
        progress("processes in dn-eu1/dn-eu2 stopped")

        if (PG_ROOT / "data" / "PG_VERSION").exists():
            Cluster(PG_ROOT, SANDBOX_PG_PORT, PG_ROOT / "pgpass").stop()  # stop() reads no passfile
        for pid in sandbox_processes():
            _stop(pid, signal.SIGKILL, timeout=5)

        for point in sorted((m for m in _mountpoints() if m == str(ROOT) or m.startswith(str(ROOT) + "/")),
                            key=len, reverse=True):
            _umount(point)
        for r in REGIONS:
            if Path(f"/sys/class/net/{r.veth}").exists():
                _run(["ip", "link", "del", r.veth], check=False)
            if Path(f"/run/netns/{r.netns}").exists():
                _run(["ip", "netns", "del", r.netns], check=False)
        progress("namespaces dn-eu1 and dn-eu2 removed")
        _remove_cgroups()

        for d in state.get("data_dirs", []):
            files = ClientFiles.of(Path(d))
            if d in state.get("embedded_data_dirs", []):
                kept = set_aside_records(Path(d))
                if kept is not None:
                    progress(f"{d}: its records of this sandbox (stacks, state, audit witness, evidence...) "
                             f"set aside in {kept}")
            for f in files.all():
                f.unlink(missing_ok=True)
            for leftover in (files.dir, files.dir.parent):
                try:
                    leftover.rmdir()  # only if empty: the rest of a data dir is not the sandbox's
                except OSError:
                    pass
        for sub in (EU1.prefix, EU2.prefix, PG_ROOT, IMAGE_DIR, ROOT / "overlay-probe"):
            shutil.rmtree(sub, ignore_errors=True)
        STATE_PATH.unlink(missing_ok=True)
        try:
            ROOT.rmdir()
        except OSError:
            pass

        preexisting = state.get("preexisting", {d: True for d in RUNTIME_DIRS})
        if not state.get("netns_mount_preexisting", True) and "/run/netns" in _mountpoints() \
                and not os.listdir("/run/netns"):
            _umount("/run/netns")
        for d in RUNTIME_DIRS:
            if not preexisting.get(d, True):
                try:
                    os.rmdir(d)
                except OSError:
                    pass  # not empty: someone else uses it now
        progress("files removed")


# --------------------------------------------------------------------------------------------
# certificates for the sandbox's tenants
# --------------------------------------------------------------------------------------------
def issue_certificate(host_prefix: str, cert_dir: str, domains: list[str], *, days: int = 90) -> tuple[Path, Path]:
    """A self-signed certificate for ``domains`` in the sandbox host's certificate directory.

    What ACME issuance does on a real host: ``<cert_dir>/<first domain>.crt`` and ``.key`` (0600),
    where dn's nginx vhost expects them. Only for the sandbox: browsers will not trust it.
    """
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from dn.errors import InvalidInput
    from dn.models import normalize_domain

    if not domains:
        raise InvalidInput("domain", "give at least one domain")
    names = []
    for d in domains:
        try:
            names.append(normalize_domain(d, allow_wildcard=True))
        except ValueError as e:
            raise InvalidInput("domain", str(e)) from None
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(key, hashes.SHA256()))
    base = Path(host_prefix.rstrip("/") + cert_dir)
    base.mkdir(parents=True, exist_ok=True, mode=0o755)
    stem = names[0].replace("*", "_wildcard")
    crt, pem = base / f"{stem}.crt", base / f"{stem}.key"
    _write_if_changed(pem, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()), 0o600)
    _write_if_changed(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return crt, pem
