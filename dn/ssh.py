"""SSH to dn's hosts: pinned host keys, quoted argv, secrets over stdin, atomic file installs.

The only module that imports paramiko. Everything dn does on a host goes through a ``Session``:

- ``connect(target)`` opens a session. The host key must be pinned (``target.host_key`` or an entry
  in ``target.known_hosts``); an unknown, changed or revoked key is refused with a HostKeyError that
  names the host and the SHA256 fingerprints (as ``ssh-keygen -l`` prints them). Key auth only: no
  password, no agent, no ``~/.ssh`` key search.
- ``Session.run(argv)`` runs one command. Every argument is shell-quoted, so what arrives is exactly
  ``argv``. Secrets travel only on ``stdin``, which is never logged nor put into an exception.
- ``Session.transaction()`` stages files next to their targets, swaps them all into place by atomic
  rename keeping the previous versions, runs a check, and on failure puts every previous version
  back (removing files that did not exist). ``install_file`` is a one-file transaction.

The parsing helpers (known_hosts, public keys, quoting) are pure functions.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import posixpath
import re
import secrets
import select
import shlex
import socket
import stat as statmod
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union

import paramiko
from paramiko.sftp import CMD_EXTENDED

from dn.config import SSHTarget
from dn.errors import ConfigError, DnError, HostKeyError, InvalidInput, OperationFailed, Unreachable

log = logging.getLogger("dn.ssh")

DEFAULT_PORT = 22
KEEPALIVE_SECONDS = 15
STDERR_TAIL = 1500  # characters of a failed command's stderr kept in its error message
# A command dn gave up on (its timeout passed) must not keep running on the host: each command runs
# under coreutils' timeout, which sends TERM this long after dn's own deadline, and KILL 5 s later.
HOST_STOP_MARGIN = 2.0
TMP_MARK = ".dn-tmp-"
PREV_MARK = ".dn-prev"


# --------------------------------------------------------------------------------------------
# Pure helpers: quoting, public keys, known_hosts
# --------------------------------------------------------------------------------------------
def quote_argv(argv: Sequence[str]) -> str:
    """The remote command line for ``argv``: every argument single-quoted for a POSIX shell."""
    if isinstance(argv, (str, bytes)) or not isinstance(argv, Sequence) or not argv:
        raise InvalidInput("argv", "must be a non-empty list of strings (one command, never a shell string)")
    for a in argv:
        if not isinstance(a, str):
            raise InvalidInput("argv", f"every argument must be a string, not {type(a).__name__}")
        if "\0" in a:
            raise InvalidInput("argv", "an argument cannot contain a NUL byte")
    return " ".join(shlex.quote(a) for a in argv)


@dataclass(frozen=True)
class PublicKey:
    """An SSH public key: its algorithm name and wire-format blob."""

    type: str
    blob: bytes

    @property
    def fingerprint(self) -> str:
        """``SHA256:...`` exactly as ``ssh-keygen -l`` prints it."""
        return "SHA256:" + base64.b64encode(hashlib.sha256(self.blob).digest()).decode().rstrip("=")

    def describe(self) -> str:
        return f"{self.type} {self.fingerprint}"

    def openssh(self) -> str:
        """The key as written in authorized_keys / known_hosts: ``type base64``."""
        return f"{self.type} {base64.b64encode(self.blob).decode()}"


def parse_public_key(text: str) -> PublicKey:
    """Parse ``"<type> <base64> [comment]"``. Raises ValueError saying what is wrong."""
    parts = text.strip().split()
    if len(parts) < 2:
        raise ValueError('expected "<key-type> <base64> [comment]"')
    ktype, b64 = parts[0], parts[1]
    try:
        blob = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the key data is not valid base64") from None
    if len(blob) < 4:
        raise ValueError("the key data is too short")
    (n,) = struct.unpack(">I", blob[:4])
    inner = blob[4 : 4 + n]
    if len(inner) != n or inner.decode("ascii", "replace") != ktype:
        raise ValueError(f"the key data is not a {ktype} key")
    # Every public key format is a sequence of length-prefixed fields; they must fill the blob.
    pos, fields = 4 + n, 0
    while pos < len(blob):
        if pos + 4 > len(blob):
            raise ValueError("the key data is truncated")
        (n,) = struct.unpack(">I", blob[pos : pos + 4])
        pos += 4 + n
        fields += 1
    if pos != len(blob) or fields == 0:
        raise ValueError("the key data is truncated")
    return PublicKey(ktype, blob)


def known_hosts_name(host: str, port: int) -> str:
    """How OpenSSH names ``host:port`` in known_hosts: bare for port 22, else ``[host]:port``."""
    return host if port == DEFAULT_PORT else f"[{host}]:{port}"


def _glob_match(name: str, pattern: str) -> bool:
    # known_hosts patterns know only '*' and '?'; '[' is literal (it brackets host:port names).
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, name, flags=re.IGNORECASE | re.DOTALL) is not None


def host_matches(hosts_field: str, host: str, port: int = DEFAULT_PORT) -> bool:
    """Whether a known_hosts host field (patterns, negations, or a hashed ``|1|salt|hash``)
    names ``host:port``."""
    name = known_hosts_name(host.lower(), port)
    if hosts_field.startswith("|1|"):
        parts = hosts_field.split("|")
        if len(parts) != 4:
            return False
        try:
            salt = base64.b64decode(parts[2], validate=True)
            want = base64.b64decode(parts[3], validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), want)
    matched = False
    for pattern in hosts_field.split(","):
        negated = pattern.startswith("!")
        pattern = pattern[1:] if negated else pattern
        if _glob_match(name, pattern):
            if negated:
                return False  # a negated match wins over every positive one
            matched = True
    return matched


@dataclass(frozen=True)
class KnownHost:
    hosts: str  # the host field as written
    key: PublicKey
    marker: str | None = None  # "@revoked" or "@cert-authority"
    lineno: int = 0


@dataclass(frozen=True)
class KnownHostsFile:
    entries: tuple[KnownHost, ...]
    skipped: tuple[tuple[int, str], ...]  # (line number, why) for lines that could not be read


def parse_known_hosts(text: str) -> KnownHostsFile:
    """Parse OpenSSH known_hosts text. Lines that cannot be read are skipped and reported."""
    entries: list[KnownHost] = []
    skipped: list[tuple[int, str]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        marker = None
        if fields[0].startswith("@"):
            marker = fields.pop(0)
            if marker not in ("@revoked", "@cert-authority"):
                skipped.append((lineno, f"unknown marker {marker}"))
                continue
        if len(fields) < 3:
            skipped.append((lineno, "expected: hosts key-type base64-key [comment]"))
            continue
        try:
            key = parse_public_key(" ".join(fields[1:3]))
        except ValueError as e:
            skipped.append((lineno, str(e)))
            continue
        entries.append(KnownHost(fields[0], key, marker, lineno))
    return KnownHostsFile(tuple(entries), tuple(skipped))


@dataclass(frozen=True)
class PinnedKeys:
    keys: tuple[PublicKey, ...]
    revoked: tuple[PublicKey, ...] = ()
    sources: tuple[str, ...] = ()  # where they came from, for messages


def pinned_keys_for(host: str, port: int, host_key: str | None, known_hosts_text: str | None,
                    known_hosts_path: str | None = None) -> PinnedKeys:
    """The keys pinned for ``host:port`` by a ``host_key`` value and/or known_hosts text."""
    keys: list[PublicKey] = []
    revoked: list[PublicKey] = []
    sources: list[str] = []
    if host_key:
        try:
            keys.append(parse_public_key(host_key))
        except ValueError as e:
            raise ConfigError(f"host_key: {e}") from None
        sources.append("host_key")
    if known_hosts_text is not None:
        sources.append(known_hosts_path or "known_hosts")
        for entry in parse_known_hosts(known_hosts_text).entries:
            if not host_matches(entry.hosts, host, port):
                continue
            if entry.marker == "@revoked":
                revoked.append(entry.key)
            elif entry.marker is None:
                keys.append(entry.key)
            # @cert-authority lines pin a CA, not a host key; dn does not use host certificates.
    return PinnedKeys(tuple(dict.fromkeys(keys)), tuple(revoked), tuple(sources))


def check_host_key(seen: PublicKey, pinned: PinnedKeys, where: str) -> None:
    """Accept ``seen`` only if it is pinned and not revoked; otherwise raise HostKeyError."""
    where_pinned = " and ".join(pinned.sources) or "host_key/known_hosts"
    if seen in pinned.revoked:
        raise HostKeyError(
            f"{where} presented a REVOKED host key {seen.describe()}; refusing to connect "
            f"(fix: verify the host out of band and pin its new key in {where_pinned})",
            hint=f"the key is marked @revoked in {where_pinned}; verify the host out of band and pin its new key",
        )
    if seen in pinned.keys:
        return
    if not pinned.keys:
        raise HostKeyError(
            f"host key of {where} is not pinned: the host presented {seen.describe()}; refusing to connect "
            f"(fix: verify {seen.fingerprint} out of band, then pin it in host_key or {where_pinned})",
            hint=f"verify this fingerprint out of band (on the host: ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub), "
                 f"then add the key to host_key or to {where_pinned}",
        )
    expected = ", ".join(k.describe() for k in pinned.keys)
    raise HostKeyError(
        f"host key of {where} CHANGED: the host presented {seen.describe()}, pinned is {expected}; refusing to connect "
        f"(fix: verify {seen.fingerprint} out of band; only if it is the host's real key, pin it in {where_pinned})",
        hint="this is either a reinstalled host or someone in the middle: verify the new fingerprint out of band, "
             f"then update {where_pinned}",
    )


def host_key_algorithms(pinned: Sequence[PublicKey], available: Sequence[str]) -> list[str]:
    """Server host key algorithms to offer, the pinned key types first, so a host with several
    keys presents the one that is pinned."""
    first: list[str] = []
    for k in pinned:
        first += ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"] if k.type == "ssh-rsa" else [k.type]
    head = [a for a in dict.fromkeys(first) if a in available]
    return head + [a for a in available if a not in head]


def redact(text: str, secret: bytes | None) -> str:
    """Remove ``secret`` (and each of its non-trivial lines) from ``text``."""
    if not secret:
        return text
    s = secret.decode("utf-8", "replace")
    pieces = sorted({s.strip(), *(line.strip() for line in s.splitlines())}, key=len, reverse=True)
    for p in pieces:
        if len(p) >= 4:
            text = text.replace(p, "[redacted]")
    return text


def _tail(text: str, limit: int = STDERR_TAIL) -> str:
    text = text.strip()
    return text if len(text) <= limit else "…" + text[-limit:]


def _short(cmd: str, limit: int = 200) -> str:
    return cmd if len(cmd) <= limit else cmd[:limit] + "…"


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
class AuthRefused(Unreachable):
    """The host refused dn's key."""


class CommandFailed(OperationFailed):
    """A remote command exited non-zero. Carries rc and the (trimmed, redacted) stderr."""

    def __init__(self, message: str, *, rc: int, stderr: str, command: str, **kw) -> None:
        super().__init__(message, **kw)
        self.rc = rc
        self.stderr = stderr
        self.command = command


class CommandTimeout(OperationFailed):
    """A remote command did not finish in time."""


class ValidationFailed(CommandFailed):
    """A staged file was refused by its validation command; nothing was changed."""


class CheckFailed(OperationFailed):
    """The check after a swap failed; every previous version was put back."""


class RollbackIncomplete(OperationFailed):
    """A rollback could not finish (usually the connection dropped); the message lists each file."""


# --------------------------------------------------------------------------------------------
# Connecting
# --------------------------------------------------------------------------------------------
def _read_pins(target: SSHTarget) -> PinnedKeys:
    text = None
    if target.known_hosts:
        try:
            text = Path(target.known_hosts).read_text()
        except FileNotFoundError:
            raise ConfigError(
                f"known_hosts {target.known_hosts}: file not found",
                hint="create it with the host's verified key (for the sandbox: dn sandbox up)",
            ) from None
        except OSError as e:
            raise ConfigError(f"known_hosts {target.known_hosts}: cannot read: {e.strerror}") from None
    return pinned_keys_for(target.address, target.port, target.host_key, text,
                           str(target.known_hosts) if target.known_hosts else None)


def _load_key(path: Path, passphrase: str | None) -> paramiko.PKey:
    if not Path(path).exists():
        raise ConfigError(f"key_path {path}: file not found", hint="point key_path at dn's private key "
                          "(for the sandbox: dn sandbox up)")
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key_file(str(path), password=passphrase)
        except paramiko.PasswordRequiredException:
            raise ConfigError(f"key_path {path}: the key is encrypted; supply its passphrase") from None
        except (paramiko.SSHException, ValueError, TypeError):
            continue  # another key type, or the wrong passphrase
        except OSError as e:
            raise ConfigError(f"key_path {path}: cannot read: {e.strerror}") from None
    raise ConfigError(f"key_path {path}: cannot load the private key (wrong passphrase, or not an "
                      "ed25519, ECDSA or RSA key)")


def _open_socket(target: SSHTarget, where: str) -> socket.socket:
    t = target.connect_timeout
    hint = "check the address and port, that sshd runs there, and the firewall (admin_sources)"
    try:
        sock = socket.create_connection((target.address, target.port), timeout=t)
        # Small request/response packets: without this, Nagle plus delayed ACKs add ~40 ms to each.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    except ConnectionRefusedError:
        raise Unreachable(f"cannot reach {where}: connection refused", hint=hint) from None
    except (socket.timeout, TimeoutError):
        raise Unreachable(f"cannot reach {where}: no answer within {t:g}s", hint=hint + "; or raise connect_timeout") from None
    except socket.gaierror as e:
        raise Unreachable(f"cannot reach {where}: cannot resolve the address ({e.strerror})", hint=hint) from None
    except OSError as e:
        raise Unreachable(f"cannot reach {where}: {e.strerror or e}", hint=hint) from None


def connect(target: SSHTarget, *, passphrase: str | None = None) -> "Session":
    """Open an authenticated session to ``target`` (use it as a context manager).

    Raises HostKeyError (unknown, changed or revoked host key), AuthRefused (key not accepted),
    Unreachable (refused, timed out, no SSH server) or ConfigError (missing key or known_hosts).
    """
    where = f"{target.user}@{known_hosts_name(target.address, target.port)}"
    pinned = _read_pins(target)
    pkey = _load_key(target.key_path, passphrase)
    sock = _open_socket(target, where)
    transport = paramiko.Transport(sock)
    try:
        timeout = target.connect_timeout
        transport.banner_timeout = timeout
        transport.handshake_timeout = timeout
        transport.auth_timeout = timeout
        opts = transport.get_security_options()
        opts.key_types = host_key_algorithms(pinned.keys, list(opts.key_types))
        try:
            transport.start_client(timeout=timeout)
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise Unreachable(f"cannot reach {where}: SSH handshake failed ({e or type(e).__name__})",
                              hint="is an SSH server listening on that port?") from None
        server_key = transport.get_remote_server_key()
        check_host_key(PublicKey(server_key.get_name(), server_key.asbytes()), pinned, where)
        ours = PublicKey(pkey.get_name(), pkey.asbytes())
        try:
            transport.auth_publickey(target.user, pkey)
        except paramiko.BadAuthenticationType as e:
            raise AuthRefused(f"{where} does not accept public-key authentication (it offers: "
                              f"{', '.join(e.allowed_types) or 'nothing'})") from None
        except paramiko.AuthenticationException:
            raise AuthRefused(
                f"{where} refused dn's key {ours.fingerprint} ({target.key_path})",
                hint=f"add {target.key_path}.pub to {target.user}'s authorized_keys on the host, or fix key_path",
            ) from None
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise Unreachable(f"lost {where} during authentication ({e or type(e).__name__})") from None
        if not transport.is_authenticated():
            raise AuthRefused(f"{where} wants more than public-key authentication; dn uses keys only")
        transport.set_keepalive(KEEPALIVE_SECONDS)
    except BaseException:
        transport.close()
        raise
    log.debug("connected to %s (host key %s)", where, PublicKey(server_key.get_name(), server_key.asbytes()).fingerprint)
    return Session(target, transport, where)


HOST_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
                  "rsa-sha2-512")
# The handshakes of offered_host_keys log here: asking a host for a key type it lacks is expected,
# and paramiko would otherwise print that refusal's traceback on stderr.
_keyscan_log = logging.getLogger("dn.ssh.keyscan")
_keyscan_log.addHandler(logging.NullHandler())
_keyscan_log.propagate = False


def offered_host_keys(target: SSHTarget, key_types: Sequence[str] = HOST_KEY_TYPES) -> dict[str, PublicKey | None]:
    """The host key ``target`` presents for each of ``key_types`` (None: it has none of that
    type): one handshake each, no login, nothing checked. What any client asking for that type
    would be shown, e.g. a key revoked in dn's pins that the host still serves."""
    where = f"{target.user}@{known_hosts_name(target.address, target.port)}"
    out: dict[str, PublicKey | None] = {}
    for kt in key_types:
        transport = paramiko.Transport(_open_socket(target, where))
        transport.set_log_channel(_keyscan_log.name)
        try:
            transport.banner_timeout = transport.handshake_timeout = target.connect_timeout
            transport.get_security_options().key_types = [kt]
            try:
                transport.start_client(timeout=target.connect_timeout)
            except paramiko.SSHException as e:
                if "no acceptable host key" in str(e).lower():
                    out[kt] = None
                    continue
                raise Unreachable(f"cannot reach {where}: SSH handshake failed ({e})") from None
            except (EOFError, OSError) as e:
                raise Unreachable(f"cannot reach {where}: SSH handshake failed ({e or type(e).__name__})") from None
            key = transport.get_remote_server_key()
            out[kt] = PublicKey(key.get_name(), key.asbytes())
        finally:
            transport.close()
    return out


# --------------------------------------------------------------------------------------------
# Session
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Result:
    rc: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.rc == 0

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")


@dataclass(frozen=True)
class InstallResult:
    changed: bool
    backup_path: str | None  # the previous version, kept next to the file (None: there was none)


@dataclass(frozen=True)
class TxResult:
    changed: tuple[str, ...]  # paths written or removed
    backups: dict[str, str] = field(default_factory=dict)  # path -> where its previous version is kept


Check = Union[Sequence[str], Callable[["Session"], None]]
Owner = Union[str, int, None]


def _check_path(path: str, what: str = "path") -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise InvalidInput(what, f"{path!r} must be an absolute path")
    norm = posixpath.normpath(path)
    if norm in ("/", "//") or path.endswith("/") or norm != path:
        raise InvalidInput(what, f"{path!r} must be a normalised absolute path to a file")
    return path


class Session:
    """An authenticated SSH connection to one host. Close it (or use ``with``)."""

    def __init__(self, target: SSHTarget, transport: paramiko.Transport, where: str) -> None:
        self.target = target
        self.where = where
        self._t = transport
        self._sftp: paramiko.SFTPClient | None = None
        self._ids: dict[tuple[str, str], int] = {}

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._sftp is not None:
            try:
                self._sftp.close()
            except Exception:  # closing a dead connection is not an error worth reporting
                pass
            self._sftp = None
        self._t.close()

    @property
    def active(self) -> bool:
        return self._t.is_active()

    def _lost(self, doing: str, e: BaseException | None = None) -> Unreachable:
        detail = f" ({e})" if e and str(e) else ""
        return Unreachable(f"lost the connection to {self.where} while {doing}{detail}",
                           hint="check the host and rerun; dn's file installs leave each file whole (old or new)")

    # -- commands ----------------------------------------------------------------------------
    def run(self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float | None = None,
            check: bool = True) -> Result:
        """Run ``argv`` on the host; return Result(rc, stdout, stderr).

        Each argument is quoted, so it arrives verbatim. ``stdin`` (bytes) is the only channel
        for secrets: it is never logged and never appears in an error. ``check`` raises
        CommandFailed on a non-zero exit. ``timeout`` defaults to the target's command_timeout;
        on expiry the channel is closed and CommandTimeout raised; the host stops the command
        ``HOST_STOP_MARGIN`` seconds later (it runs under ``timeout``).
        """
        cmd = quote_argv(argv)
        if stdin is not None and not isinstance(stdin, (bytes, bytearray)):
            raise InvalidInput("stdin", "must be bytes")
        limit = self.target.command_timeout if timeout is None else timeout
        log.debug("%s: run %s", self.where, _short(cmd))
        try:
            chan = self._t.open_session(timeout=self.target.connect_timeout)
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise self._lost(f"opening a channel for `{_short(cmd, 60)}`", e) from None
        sender: threading.Thread | None = None
        try:
            chan.exec_command(quote_argv(["timeout", "--kill-after=5", f"{limit + HOST_STOP_MARGIN:.3f}", *argv]))
            if stdin:
                sender = threading.Thread(target=_feed, args=(chan, bytes(stdin)), daemon=True)
                sender.start()
            else:
                chan.shutdown_write()
            out, err = bytearray(), bytearray()
            deadline = time.monotonic() + limit
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CommandTimeout(
                        f"{self.where}: `{_short(cmd)}` did not finish within {limit:g}s",
                        hint=f"the host stops it {HOST_STOP_MARGIN:g}s later; raise the timeout if it needs longer",
                    )
                select.select([chan], [], [], min(remaining, 0.5))
                while chan.recv_ready():
                    out += chan.recv(65536)
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                if chan.exit_status_ready() and (chan.eof_received or chan.closed) \
                        and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                if not self._t.is_active():
                    raise self._lost(f"running `{_short(cmd, 60)}`")
            rc = chan.recv_exit_status()
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise self._lost(f"running `{_short(cmd, 60)}`", e) from None
        finally:
            chan.close()
            if sender is not None:
                sender.join(timeout=5)
        if rc == -1 and not self._t.is_active():
            raise self._lost(f"running `{_short(cmd, 60)}`")
        result = Result(rc, bytes(out), bytes(err))
        if check and rc != 0:
            stderr = _tail(redact(result.stderr.decode("utf-8", "replace"), stdin))
            raise CommandFailed(
                f"{self.where}: `{_short(cmd)}` exited with {rc}" + (f": {stderr}" if stderr else ""),
                rc=rc, stderr=stderr, command=cmd,
            )
        return result

    # -- SFTP helpers -------------------------------------------------------------------------
    @property
    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            try:
                self._sftp = self._t.open_sftp_client()
            except (paramiko.SSHException, EOFError, OSError) as e:
                raise OperationFailed(f"{self.where}: SFTP is not available ({e})") from None
        return self._sftp

    def _sftp_do(self, doing: str, fn: Callable, *args):
        try:
            return fn(*args)
        except (paramiko.SSHException, EOFError) as e:
            raise self._lost(doing, e) from None
        except OSError as e:
            if not self._t.is_active():
                raise self._lost(doing, e) from None
            raise OperationFailed(f"{self.where}: {doing}: {e.strerror or e}") from None

    def _extended(self, name: str, *args) -> None:
        self.sftp._request(CMD_EXTENDED, name, *args)

    def stat(self, path: str) -> paramiko.SFTPAttributes | None:
        """lstat of ``path``, or None if it does not exist."""
        def lstat() -> paramiko.SFTPAttributes | None:
            try:
                return self.sftp.lstat(path)
            except FileNotFoundError:
                return None
        return self._sftp_do(f"stat {path}", lstat)

    def exists(self, path: str) -> bool:
        return self.stat(path) is not None

    def read_file(self, path: str) -> bytes:
        """The content of a remote file."""
        def read() -> bytes:
            with self.sftp.open(path, "rb") as f:
                f.prefetch()
                return f.read()
        return self._sftp_do(f"reading {path}", read)

    def listdir(self, path: str) -> list[str]:
        return sorted(self._sftp_do(f"listing {path}", self.sftp.listdir, path))

    def remove(self, path: str, *, missing_ok: bool = True) -> bool:
        """Remove a file; return whether it existed."""
        _check_path(path)
        if missing_ok and not self.exists(path):
            return False
        self._sftp_do(f"removing {path}", self.sftp.remove, path)
        return True

    def mkdir_p(self, path: str, mode: int = 0o755) -> None:
        """Create ``path`` and its missing parents (like ``mkdir -p``)."""
        if not path.startswith("/"):
            raise InvalidInput("path", f"{path!r} must be absolute")
        current = ""
        for part in [p for p in path.split("/") if p]:
            current += "/" + part
            st = self.stat(current)
            if st is None:
                self._sftp_do(f"creating directory {current}", self.sftp.mkdir, current, mode)
            elif not statmod.S_ISDIR(st.st_mode or 0) and not statmod.S_ISLNK(st.st_mode or 0):
                raise OperationFailed(f"{self.where}: {current} exists and is not a directory")

    def resolve_owner(self, owner: Owner, group: Owner) -> tuple[int | None, int | None]:
        """Numeric uid/gid for user/group names (looked up on the host), or ints as given."""
        def lookup(kind: str, name: Owner) -> int | None:
            if name is None or isinstance(name, int):
                return name
            if not re.fullmatch(r"[a-z_][a-z0-9_-]*\$?", name):
                raise InvalidInput(kind, f"{name!r} is not a valid {kind} name")
            if (kind, name) not in self._ids:
                argv = ["id", "-u", name] if kind == "owner" else ["getent", "group", name]
                r = self.run(argv, check=False)
                if r.rc != 0:
                    raise InvalidInput(kind, f"{name!r} does not exist on {self.where}")
                value = r.text.strip() if kind == "owner" else r.text.strip().split(":")[2]
                self._ids[(kind, name)] = int(value)
            return self._ids[(kind, name)]
        return lookup("owner", owner), lookup("group", group)

    # -- atomic installs -----------------------------------------------------------------------
    def transaction(self, *, check: Check | None = None,
                    on_rollback: Callable[["Session"], None] | None = None) -> "Transaction":
        """Stage several files, then swap them all into place; see Transaction."""
        return Transaction(self, check=check, on_rollback=on_rollback)

    def install_file(self, path: str, data: bytes, *, mode: int = 0o644, owner: Owner = None,
                     group: Owner = None, validate: Sequence[str] | None = None,
                     keep_previous: bool = True) -> InstallResult:
        """Install ``data`` at ``path`` atomically; skip if it is already exactly this.

        The content goes to a temp file in the same directory (mode and owner set before any byte
        is written, fsynced), is checked by ``validate`` (an argv in which ``{path}`` stands for the
        temp file) and renamed into place. The previous version is kept as ``.<name>.dn-prev``
        unless ``keep_previous`` is False. For several files, or a check of the installed tree
        with rollback, use ``transaction()``.
        """
        with self.transaction() as tx:
            tx.put(path, data, mode=mode, owner=owner, group=group, validate=validate,
                   keep_previous=keep_previous)
        result = tx.result
        if result is None:  # pragma: no cover - commit() either sets it or raises
            raise OperationFailed(f"{self.where}: installing {path} did not complete")
        return InstallResult(path in result.changed, result.backups.get(path))


def _feed(chan: paramiko.Channel, data: bytes) -> None:
    try:
        chan.sendall(data)
        chan.shutdown_write()
    except Exception:  # the command exited without reading all of stdin: its exit status tells
        pass


@dataclass
class _Staged:
    path: str
    kind: str  # "put" or "delete"
    tmp: str | None = None
    keep_previous: bool = True
    tx_backup: str | None = None  # where the previous version waits while the transaction runs


class Transaction:
    """Stage files, swap them all into place, check, else restore every previous version.

    ``put``/``delete`` stage changes; ``put`` writes the temp file (same directory, mode and owner
    set before any byte, fsynced) and runs its ``validate`` argv at once, so a bad file stops the
    transaction before anything changes. ``commit`` (called by ``with`` on success) then, for each
    changed file in order, hard-links the current version aside and renames the staged file over
    it: every file is replaced atomically, readers see the old or the new version, never a mix.
    Then it runs ``check`` (an argv, or a callable taking the Session that raises on failure), e.g.
    ``nginx -t`` against the real tree. If the check fails, every previous version is renamed back
    (files that did not exist are removed), ``on_rollback`` runs (e.g. reload the old config) and
    CheckFailed is raised. After success the previous version of each replaced file stays next to
    it as ``.<name>.dn-prev`` (unless ``keep_previous=False``); deleted files leave nothing.
    """

    def __init__(self, session: Session, *, check: Check | None = None,
                 on_rollback: Callable[[Session], None] | None = None) -> None:
        self.s = session
        self.check = check
        self.on_rollback = on_rollback
        self._staged: dict[str, _Staged] = {}
        self._unchanged: set[str] = set()
        self._done = False
        self.txid = secrets.token_hex(4)
        self.result: TxResult | None = None

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._done:
            return
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    # -- staging -------------------------------------------------------------------------------
    def _names(self, path: str) -> tuple[str, str, str]:
        d, name = posixpath.split(path)
        return d, f"{d}/.{name}{TMP_MARK}{self.txid}", f"{d}/.{name}{PREV_MARK}"

    def stage(self, files: Mapping[str, bytes | None], *, mode: int = 0o644) -> None:
        """Stage a whole set: ``put`` each file with content, ``delete`` each one mapped to None."""
        for path, data in files.items():
            if data is None:
                self.delete(path)
            else:
                self.put(path, data, mode=mode)

    def put(self, path: str, data: bytes, *, mode: int = 0o644, owner: Owner = None, group: Owner = None,
            validate: Sequence[str] | None = None, keep_previous: bool = True) -> bool:
        """Stage ``data`` for ``path``; return False if the file is already exactly this.

        ``validate`` is an argv run against the staged temp file (``{path}`` stands for it);
        a non-zero exit raises ValidationFailed and the transaction is aborted.
        """
        s = self.s
        self._open(path)
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidInput("data", f"{path}: content must be bytes")
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
            raise InvalidInput("mode", f"{path}: {mode!r} is not a file mode")
        if validate is not None:
            quote_argv(validate)
        data = bytes(data)
        uid, gid = s.resolve_owner(owner, group)
        current = s.stat(path)
        if current is not None and not statmod.S_ISREG(current.st_mode or 0):
            raise OperationFailed(f"{s.where}: {path} exists and is not a regular file")
        if current is not None:
            uid = current.st_uid if uid is None else uid
            gid = current.st_gid if gid is None else gid
            if (current.st_size == len(data) and statmod.S_IMODE(current.st_mode) == mode
                    and current.st_uid == uid and current.st_gid == gid and s.read_file(path) == data):
                self._unchanged.add(path)
                return False
        d, tmp, _ = self._names(path)
        if s.stat(d) is None:
            raise OperationFailed(f"{s.where}: directory {d} does not exist", hint="create it first (mkdir_p)")
        self._remove_stale_temps(path)
        # Registered before writing so that abort() also removes a partly written temp file.
        self._staged[path] = _Staged(path, "put", tmp=tmp, keep_previous=keep_previous)

        def write() -> None:
            with s.sftp.open(tmp, "wx") as f:
                f.chmod(0o600)  # nothing is readable by others before mode and owner are final
                st = f.stat()
                want = (st.st_uid if uid is None else uid, st.st_gid if gid is None else gid)
                if want != (st.st_uid, st.st_gid):
                    f.chown(*want)
                f.chmod(mode)
                f.set_pipelined(True)
                f.write(data)
                f.flush()
                # Pipelined write errors are not reported one by one: the size tells (e.g. disk full).
                written = f.stat().st_size
                if written != len(data):
                    raise OperationFailed(f"{s.where}: {tmp}: wrote {written} of {len(data)} bytes (disk full?)")
                s._extended("fsync@openssh.com", f.handle)

        try:
            s._sftp_do(f"writing {tmp}", write)
            if validate:
                argv = [a.replace("{path}", tmp) for a in validate]
                r = s.run(argv, check=False)
                if r.rc != 0:
                    out = _tail((r.stderr + r.stdout).decode("utf-8", "replace"))
                    raise ValidationFailed(
                        f"{s.where}: {path}: validation `{_short(quote_argv(validate))}` refused the new "
                        f"content (exit {r.rc}): {out}",
                        rc=r.rc, stderr=out, command=quote_argv(argv), hint="nothing was changed on the host",
                    )
        except BaseException:
            self.abort()
            raise
        return True

    def delete(self, path: str) -> bool:
        """Stage the removal of ``path``; return False if it does not exist."""
        self._open(path)
        current = self.s.stat(path)
        if current is None:
            self._unchanged.add(path)
            return False
        if statmod.S_ISDIR(current.st_mode or 0):
            raise OperationFailed(f"{self.s.where}: {path} is a directory; dn removes files only")
        self._staged[path] = _Staged(path, "delete", keep_previous=False)
        return True

    def _open(self, path: str) -> None:
        _check_path(path)
        if self._done:
            raise OperationFailed("this transaction is already finished")
        if path in self._staged or path in self._unchanged:
            raise InvalidInput("path", f"{path} is staged twice in one transaction")

    def _remove_stale_temps(self, path: str) -> None:
        # A connection lost while writing leaves a dot-named temp file; the next put cleans it.
        d, name = posixpath.split(path)
        prefix = f".{name}{TMP_MARK}"
        for entry in self.s.listdir(d):
            if entry.startswith(prefix):
                self.s._sftp_do(f"removing {d}/{entry}", self.s.sftp.remove, f"{d}/{entry}")

    @property
    def pending(self) -> list[str]:
        """Paths that commit would change."""
        return list(self._staged)

    # -- commit / rollback ---------------------------------------------------------------------
    def commit(self) -> TxResult:
        """Swap every staged file into place and run the check; on any failure roll back."""
        if self._done:
            raise OperationFailed("this transaction is already finished")
        s = self.s
        swapped: list[_Staged] = []
        phase = "swap"
        try:
            for st in self._staged.values():
                tx_backup = f"{self._names(st.path)[2]}-{self.txid}"
                if st.kind == "put":
                    if s.stat(st.path) is not None:
                        s._sftp_do(f"keeping the previous {st.path}", s._extended,
                                   "hardlink@openssh.com", st.path, tx_backup)
                        st.tx_backup = tx_backup
                    s._sftp_do(f"renaming into {st.path}", s.sftp.posix_rename, st.tmp, st.path)
                    st.tmp = None
                else:
                    s._sftp_do(f"removing {st.path}", s.sftp.posix_rename, st.path, tx_backup)
                    st.tx_backup = tx_backup
                swapped.append(st)
            phase = "check"
            if swapped and self.check is not None:
                self._run_check()
        except BaseException as e:
            self._rollback(swapped, e, phase)
            raise  # _rollback raises; this only satisfies the reader
        backups: dict[str, str] = {}
        for st in swapped:
            if not st.tx_backup:
                continue
            try:
                if st.keep_previous:
                    keep = self._names(st.path)[2]
                    s._sftp_do(f"keeping the previous {st.path}", s.sftp.posix_rename, st.tx_backup, keep)
                    backups[st.path] = keep
                else:
                    s._sftp_do(f"removing the previous {st.path}", s.sftp.remove, st.tx_backup)
            except DnError as e:  # the swap itself succeeded; only the kept copy's name is off
                log.warning("%s", e)
                backups[st.path] = st.tx_backup
        self._done = True
        self.result = TxResult(tuple(st.path for st in swapped), backups)
        return self.result

    def _run_check(self) -> None:
        check = self.check
        if callable(check):
            check(self.s)
            return
        r = self.s.run(list(check), check=False)
        if r.rc != 0:
            out = _tail((r.stderr + r.stdout).decode("utf-8", "replace"))
            raise CheckFailed(f"{self.s.where}: check `{_short(quote_argv(check))}` failed (exit {r.rc}): {out}")

    def _rollback(self, swapped: list[_Staged], cause: BaseException, phase: str) -> None:
        s = self.s
        failed: list[str] = []
        for st in reversed(swapped):
            try:
                if st.tx_backup:
                    s._sftp_do(f"restoring {st.path}", s.sftp.posix_rename, st.tx_backup, st.path)
                else:
                    s._sftp_do(f"removing {st.path}", s.sftp.remove, st.path)
            except DnError:
                if st.kind == "delete":
                    state = f"removed; previous kept at {st.tx_backup}"
                elif st.tx_backup:
                    state = f"new version in place; previous kept at {st.tx_backup}"
                else:
                    state = "new file in place"
                failed.append(f"{st.path} ({state})")
        self._discard_temps()
        self._done = True
        if failed:
            raise RollbackIncomplete(
                f"{s.where}: rollback incomplete after: {cause}; not restored: {'; '.join(failed)}",
                hint="every file is whole (old or new version); re-apply, or restore from the kept copies",
            ) from cause
        if swapped and self.on_rollback is not None:
            try:
                self.on_rollback(s)
            except DnError as e:
                raise CheckFailed(f"{cause}; previous versions restored, but restoring the running state "
                                  f"failed: {e}", hint=e.hint) from cause
        if phase == "check" and isinstance(cause, DnError):
            raise CheckFailed(f"{cause}; previous versions restored", hint=cause.hint) from cause
        raise cause

    def _discard_temps(self) -> None:
        for st in self._staged.values():
            if st.tmp:
                try:
                    self.s._sftp_do(f"removing {st.tmp}", self.s.sftp.remove, st.tmp)
                    st.tmp = None
                except DnError:
                    pass  # a dead connection leaves a dot-named temp file; the next put removes it

    def abort(self) -> None:
        """Discard everything staged; nothing on the host changes."""
        if not self._done:
            self._discard_temps()
            self._done = True
