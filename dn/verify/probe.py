"""The Probe: everything a verify check may use to look at the live system, opened lazily and
once per run.

- the settings and the host being verified (``HostConfig``, its ``HostBaseline``);
- one SSH session to the host (dn.ssh: pinned host key, quoted argv), opened on first use; a
  failure to connect is remembered, so every later check reports the same reason at once instead
  of waiting for another timeout;
- one connection to the platform database (dn.db), the second-region backup store, the drill
  history and the audit verifier;
- the active probes, which send traffic only to the configured host address (and, through
  ``docker exec`` on the host, from a tenant container to the host's own networks): a bounded TCP
  connect scan, TLS handshakes at a fixed protocol version, an HTTPS request.

Checks (the sibling modules) call these and stay free of paramiko, psycopg and sockets. Reads are
cached for the run: several checks look at the same iptables ruleset or docker state, and all of
them must judge the same snapshot.
"""
from __future__ import annotations

import errno
import http.client
import json
import selectors
import socket
import ssl
import struct
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from dn.errors import DnError
from dn.verify.core import Unknown

if TYPE_CHECKING:
    from dn.config import HostConfig, Settings
    from dn.models import HostBaseline

# Ports the active scan tries besides 1-1024 and every port the host listens on: the usual
# places a database, cache, container API or admin UI ends up when someone opens it "for a minute".
EXTRA_SCAN_PORTS = (1080, 1433, 1521, 2049, 2375, 2376, 2379, 2380, 3000, 3306, 3389, 4243, 5000, 5432,
                    5433, 5601, 5672, 5900, 5984, 6379, 6443, 7001, 8000, 8008, 8080, 8081, 8088, 8443,
                    8888, 9000, 9090, 9100, 9200, 9300, 9443, 10250, 10255, 11211, 15672, 27017, 50000)
SCAN_TIMEOUT = 0.5  # seconds a SYN may stay unanswered before the port counts as filtered
SCAN_BATCH = 512  # sockets in flight at once (fewer when the open-file limit is lower)
TLS_TIMEOUT = 5.0
CONTAINER_PROBE_TIMEOUT = 2  # seconds busybox nc waits for a connection inside a tenant container

# Run on the host inside a container's network namespace (nsenter): try every "address:port"
# given as an argument, all at once, with bash's /dev/tcp, and print "open T" or "closed T" for
# each. Host tools only, so it works whatever the image holds (sGTM's has no shell). Targets
# arrive as separate, quoted argv items ("$@") and reach the inner bash as arguments, never as
# script text.
_NETNS_PROBE = (
    'w="$1"; shift; '
    'for t in "$@"; do ( h="${t%:*}"; p="${t##*:}"; '
    'if timeout "$w" bash -c \'exec 3<>"/dev/tcp/$0/$1"\' "$h" "$p" 2>/dev/null; '
    'then echo "open $t"; else echo "closed $t"; fi ) & '
    'done; wait'
)


@dataclass(frozen=True)
class Handshake:
    """One TLS handshake attempt at a fixed protocol version."""

    sni: str
    requested: str  # "TLSv1.1", "TLSv1.2", "TLSv1.3"
    accepted: bool
    negotiated: str | None = None
    error: str | None = None  # why it did not complete (a server alert, a reset ...)
    client_cannot: bool = False  # this machine's TLS library cannot offer that version at all
    unreachable: bool = False  # no TCP connection at all
    not_after: datetime | None = None  # the served certificate's expiry


@dataclass(frozen=True)
class HttpReply:
    status: int
    headers: tuple[tuple[str, str], ...]  # (lower-case name, value), in order

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]


_TLS_VERSIONS = {
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
# OpenSSL reasons that mean "this client could not even offer the version", not "the server refused".
_CLIENT_CANNOT = ("NO_PROTOCOLS_AVAILABLE", "NO_CIPHERS_AVAILABLE", "UNSUPPORTED_PROTOCOL")


def _tls_context(version: str) -> ssl.SSLContext:
    v = _TLS_VERSIONS[version]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1_1 is deprecated: that is the point
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        # The check is about the protocol the server accepts, not about trusting its certificate.
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = v
        ctx.maximum_version = v
        if v < ssl.TLSVersion.TLSv1_2:
            # OpenSSL 3 offers TLS 1.0/1.1 only at security level 0; without this the client,
            # not the server, would refuse and the check would prove nothing.
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def _cert_not_after(der: bytes | None) -> datetime | None:
    if not der:
        return None
    try:
        from cryptography import x509

        cert = x509.load_der_x509_certificate(der)
        return cert.not_valid_after_utc
    except Exception:  # an unparseable certificate is reported as "expiry unknown"
        return None


class Probe:
    """The adapters of one `dn verify` run. Use as a context manager (or call close())."""

    def __init__(self, settings: "Settings", host: str | None = None, *,
                 environ: Mapping[str, str] | None = None, now: datetime | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.host_name = host or settings.default_host
        self.host: "HostConfig" = settings.host(self.host_name)
        self.environ = dict(environ or {})
        self.now = now or datetime.now(timezone.utc)
        self.progress = progress or (lambda _: None)
        self._session = None
        self._session_error: DnError | None = None
        self._db = None
        self._db_error: DnError | None = None
        self._store = None
        self._store_error: DnError | None = None
        self._cache: dict[Any, Any] = {}

    def __enter__(self) -> "Probe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for attr in ("_store", "_session", "_db"):
            obj = getattr(self, attr)
            if obj is not None:
                try:
                    obj.close()
                except Exception:  # closing a dead connection is not worth reporting
                    pass
                setattr(self, attr, None)

    # -- cache --------------------------------------------------------------------------------
    def cached(self, key: Any, fn: Callable[[], Any]) -> Any:
        """``fn()`` once per run; a DnError it raises is remembered and raised again."""
        if key not in self._cache:
            try:
                self._cache[key] = ("ok", fn())
            except (DnError, Unknown) as e:
                self._cache[key] = ("err", e)
        kind, value = self._cache[key]
        if kind == "err":
            raise value
        return value

    # -- the host baseline (what dn declares for this host) ------------------------------------
    @property
    def baseline(self) -> "HostBaseline":
        def build():
            from dn.models import HostBaseline

            return HostBaseline.from_settings(self.settings, self.host_name)
        return self.cached("baseline", build)

    # -- SSH ------------------------------------------------------------------------------------
    def session(self):
        if self._session_error is not None:
            raise self._session_error
        if self._session is None or not self._session.active:
            from dn import ssh

            self.progress(f"connecting to {self.host_name} ({self.host.address})")
            try:
                self._session = ssh.connect(self.host)
            except DnError as e:
                self._session_error = e
                raise
        return self._session

    def run(self, argv: Sequence[str], *, timeout: float = 60, stdin: bytes | None = None):
        """Run ``argv`` on the host (never raises for a non-zero exit; look at ``.rc``)."""
        return self.session().run(list(argv), timeout=timeout, stdin=stdin, check=False)

    def run_ok(self, argv: Sequence[str], *, timeout: float = 60, what: str | None = None) -> str:
        """Run ``argv`` on the host and return its stdout; a failure raises Unknown (could not look)."""
        r = self.run(argv, timeout=timeout)
        if r.rc != 0:
            err = r.stderr.decode("utf-8", "replace").strip().splitlines()
            raise Unknown(f"{what or argv[0]} failed on {self.host_name} (exit {r.rc})"
                          + (f": {err[-1][:200]}" if err else ""))
        return r.text

    def host_cmd(self, key: str, argv: Sequence[str], *, what: str | None = None) -> str:
        """``run_ok`` cached for the run under ``key``."""
        return self.cached(("cmd", key), lambda: self.run_ok(argv, what=what))

    def iptables_save(self, family: int) -> str:
        cmd = "iptables-save" if family == 4 else "ip6tables-save"
        return self.host_cmd(cmd, [cmd], what=cmd)

    def listeners(self) -> str:
        return self.host_cmd("ss", ["ss", "-H", "-ltnu"], what="ss -ltnu")

    def global_ipv6(self) -> str:
        return self.host_cmd("ip6", ["ip", "-6", "-o", "addr", "show", "scope", "global"], what="ip -6 addr")

    def seen_from(self) -> str | None:
        """This machine's address as the host sees it (``$SSH_CONNECTION`` there): behind NAT it
        is not the local socket's address."""
        def read():
            parts = self.run(["printenv", "SSH_CONNECTION"]).text.split()
            return parts[0] if len(parts) == 4 else None
        return self.cached("seen from", read)

    def nginx_dump(self) -> str:
        """``nginx -T`` with the host's prefix and main config: every file nginx loads, as loaded."""
        def dump():
            from dn.render.nginx import check_argv

            argv = check_argv(self.baseline)
            argv = [argv[0], "-T", *[a for a in argv[1:] if a not in ("-t", "-q")]]
            return self.run_ok(argv, what="nginx -T")
        return self.cached("nginx -T", dump)

    # -- docker on the host ---------------------------------------------------------------------
    def _docker_json(self, list_argv: list[str], inspect_argv: list[str], what: str) -> list[dict]:
        ids = self.run_ok(["docker", *list_argv], what=f"docker {what} listing").split()
        if not ids:
            return []
        out = self.run_ok(["docker", *inspect_argv, *ids], what=f"docker {what} inspect")
        try:
            return json.loads(out)
        except ValueError:
            raise Unknown(f"docker {what} inspect did not return JSON") from None

    def containers(self) -> list[dict]:
        """``docker inspect`` of every container on the host (running or not)."""
        return self.cached("containers", lambda: self._docker_json(
            ["ps", "-aq", "--no-trunc"], ["inspect", "--type", "container"], "container"))

    def networks(self) -> list[dict]:
        """``docker network inspect`` of every network on the host."""
        return self.cached("networks", lambda: self._docker_json(
            ["network", "ls", "-q", "--no-trunc"], ["network", "inspect"], "network"))

    def container_connect(self, container: str, pid: int, targets: Sequence[str],
                          timeout: int = CONTAINER_PROBE_TIMEOUT) -> dict[str, bool]:
        """From the network namespace of ``container`` (its process ``pid`` on the host), try a
        TCP connection to each ``address:port`` (all at once, ``timeout`` seconds each); returns
        target -> connected. The packets leave through the container's own interface with its
        address, exactly as the container's would."""
        if not targets:
            return {}
        argv = ["nsenter", f"--net=/proc/{int(pid)}/ns/net", "--", "bash", "-c", _NETNS_PROBE, "bash",
                str(int(timeout)), *targets]
        r = self.run(argv, timeout=timeout + 30)
        seen: dict[str, bool] = {}
        for line in r.text.splitlines():
            verdict, _, target = line.partition(" ")
            if target in targets and verdict in ("open", "closed"):
                seen[target] = verdict == "open"
        missing = [t for t in targets if t not in seen]
        if missing:
            err = r.stderr.decode("utf-8", "replace").strip().splitlines()
            raise Unknown(f"the probe in the network namespace of {container} did not report {len(missing)} of "
                          f"{len(targets)} targets" + (f" ({err[-1][:160]})" if err else f" (exit {r.rc})"))
        return seen

    # -- active probes from this machine ---------------------------------------------------------
    def tcp_scan(self, ports: Iterable[int], *, timeout: float = SCAN_TIMEOUT,
                 batch: int = SCAN_BATCH) -> dict[int, str]:
        """TCP connect to each port of the host's configured address, ``batch`` at a time, each
        given ``timeout`` seconds. Returns the ports that accepted, each with the local address
        the connection came from (the source address the host saw)."""
        import resource

        address = self.host.address
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY:
            batch = max(16, min(batch, soft // 2))
        todo = sorted({int(p) for p in ports if 0 < int(p) < 65536})
        accepted: dict[int, str] = {}
        for i in range(0, len(todo), batch):
            sel = selectors.DefaultSelector()
            socks: list[socket.socket] = []
            try:
                for port in todo[i:i + batch]:
                    s = socket.socket(family, socket.SOCK_STREAM)
                    socks.append(s)
                    s.setblocking(False)
                    rc = s.connect_ex((address, port))
                    if rc == 0:
                        accepted[port] = s.getsockname()[0]
                    elif rc in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY):
                        sel.register(s, selectors.EVENT_WRITE, port)
                deadline = time.monotonic() + timeout
                while sel.get_map():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    for key, _ in sel.select(left):
                        s = key.fileobj
                        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                            accepted[key.data] = s.getsockname()[0]
                        sel.unregister(s)
            finally:
                sel.close()
                for s in socks:
                    # RST instead of FIN: no TIME_WAIT pile-up on either side
                    try:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    except OSError:
                        pass
                    s.close()
        return accepted

    def tls_handshake(self, sni: str, version: str, *, port: int = 443,
                      timeout: float = TLS_TIMEOUT) -> Handshake:
        """One TLS handshake with the host at exactly ``version``, SNI ``sni``."""
        try:
            ctx = _tls_context(version)
        except ssl.SSLError as e:
            return Handshake(sni, version, False, error=str(e.reason or e), client_cannot=True)
        try:
            sock = socket.create_connection((self.host.address, port), timeout=timeout)
        except OSError as e:
            return Handshake(sni, version, False, error=f"no TCP connection to {self.host.address}:{port}: "
                             f"{e.strerror or e}", unreachable=True)
        try:
            with ctx.wrap_socket(sock, server_hostname=sni) as t:
                return Handshake(sni, version, True, negotiated=t.version(),
                                 not_after=_cert_not_after(t.getpeercert(binary_form=True)))
        except ssl.SSLError as e:
            reason = str(e.reason or e.__class__.__name__)
            return Handshake(sni, version, False, error=reason, client_cannot=reason in _CLIENT_CANNOT)
        except OSError as e:  # reset or closed by the server during the handshake
            return Handshake(sni, version, False, error=e.strerror or type(e).__name__)
        finally:
            sock.close()

    def https_get(self, sni: str, path: str = "/", *, port: int = 443, timeout: float = TLS_TIMEOUT) -> HttpReply:
        """GET ``path`` over TLS from the host's address with SNI and Host ``sni``; the status and
        headers of the reply (the body is not read)."""
        ctx = _tls_context("TLSv1.3")
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            sock = socket.create_connection((self.host.address, port), timeout=timeout)
        except OSError as e:
            raise Unknown(f"no TCP connection to {self.host.address}:{port}: {e.strerror or e}") from None
        try:
            with ctx.wrap_socket(sock, server_hostname=sni) as t:
                t.sendall(f"GET {path} HTTP/1.1\r\nHost: {sni}\r\nUser-Agent: dn-verify\r\n"
                          "Connection: close\r\n\r\n".encode("ascii"))
                resp = http.client.HTTPResponse(t)
                resp.begin()
                headers = tuple((k.lower(), v) for k, v in resp.getheaders())
                return HttpReply(resp.status, headers)
        except (ssl.SSLError, OSError, http.client.HTTPException) as e:
            raise Unknown(f"https://{sni}{path} via {self.host.address}: {type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:160]}") from None
        finally:
            sock.close()

    # -- the platform database -------------------------------------------------------------------
    def db(self):
        if self._db_error is not None:
            raise self._db_error
        if self._db is None:
            from dn import db

            try:
                self._db = db.connect(self.settings.database, application_name="dn verify")
            except DnError as e:
                self._db_error = e
                raise
        return self._db

    def query(self, sql: str, params: Any = None, *, what: str = "reading the platform database") -> list[dict]:
        from dn import db

        conn = self.db()
        with db.translate_errors(what):
            return db.rows(conn, sql, params)

    def table_exists(self, name: str) -> bool:
        rows = self.query("SELECT to_regclass(%s) IS NOT NULL AS present", (f"public.{name}",))
        return bool(rows and rows[0]["present"])

    def tenant_records(self) -> list:
        """The tenants registered for this host (dn.tenants registry), deleted ones excepted."""
        def load():
            from dn import tenants as registry

            with self._translate("reading the tenant registry"):
                return registry.list_tenants(self.db(), host=self.host_name)
        return self.cached("tenant records", load)

    def tenants(self) -> list[dict]:
        """``slug`` and ``status`` of every tenant registered for this host (deleted ones excepted)."""
        return [{"slug": r.slug, "status": r.status} for r in self.tenant_records()]

    def tenant_specs(self) -> list:
        """The specs of this host's tenants as the host resources see them (no secret): what dn
        renders onto the host."""
        def load():
            out = []
            for rec in self.tenant_records():
                try:
                    out.append(rec.host_view(self.settings))
                except DnError as e:
                    raise Unknown(f"tenant {rec.slug}: its registry entry is not a valid spec ({e})") from None
            return out
        return self.cached("specs", load)

    def _translate(self, what: str):
        from dn import db

        return db.translate_errors(what)

    def fernet_status(self):
        """dn.gdpr.keys.status: values per Fernet key id and each id's role (retired ...), with
        the keys of this environment (``DN_FERNET_KEYS``) when it has them."""
        def load():
            from dn.gdpr import datamap, keys

            raw = self.environ.get(keys.ENV)
            ring = keys.parse_keys(raw) if raw else None
            return keys.status(self.db(), datamap.load(), ring)
        return self.cached("fernet", load)

    # -- audit, backups, drills ------------------------------------------------------------------
    def audit_verify(self):
        """dn.audit.verify: the whole chain against head, anchors and this machine's witness."""
        def verify():
            from dn import audit
            from dn.context import Context

            return audit.verify(Context(environ=self.environ, _settings=self.settings))
        return self.cached("audit", verify)

    def backup_store(self):
        """The second-region store, opened once (no retries: verify reports, it does not wait)."""
        if self._store_error is not None:
            raise self._store_error
        if self._store is None:
            from dn.backup.run import open_store

            try:
                self._store = open_store(self.settings, retries=0)
            except DnError as e:
                self._store_error = e
                raise
        return self._store

    def backups(self) -> list:
        """Every backup directory in the second region (dn.backup.store.Listing), oldest first."""
        return self.cached("backups", lambda: self.backup_store().list())

    def artifact_sha256(self, backup_id: str, name: str) -> tuple[int, str]:
        """(size, SHA-256) of a stored artifact, read from the second region (streamed)."""
        import hashlib

        store = self.backup_store()
        reader = store.open_artifact(backup_id, name)
        h, n = hashlib.sha256(), 0
        try:
            while True:
                b = reader.read(1 << 20)
                if not b:
                    break
                h.update(b)
                n += len(b)
        finally:
            reader.close()
        return n, h.hexdigest()

    def backup_key(self, manifest) -> bytes:
        """The data key of a backup (keystore or the region's escrow), as a drill finds it; the
        caller authenticates the manifest with it. Raises Unknown, naming why, when this machine
        cannot have the key (no passphrase here, a passphrase that does not unlock it, a key in
        neither place, the region unreadable): only the key's availability is judged here."""
        from dn.backup import keys
        from dn.backup.drill import find_key

        try:
            ks = keys.keystore(self.settings, self.environ)
            return find_key(ks, self.backup_store(), manifest)
        except DnError as e:
            raise Unknown(e.message) from None

    def drill_history(self) -> list[dict]:
        from dn.backup import drill

        return self.cached("drills", lambda: drill.history(self.settings))

