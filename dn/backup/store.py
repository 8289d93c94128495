"""The second-region backup store: an SFTP directory reached through dn.ssh (host key pinned).

Layout under ``backup.path`` (the SFTP account sees nothing else)::

    <id>/.<artifact>.part        an artifact being uploaded
    <id>/<artifact>.enc          uploaded, size checked, renamed into place
    <id>/manifest.json           uploaded last: a backup exists exactly when this file does
    <id>/drill.json              the last drill's verdict on this backup (written by the drill)
    keys/<owner>.json            escrow of the owner's wrapped keystore file (see dn.backup.keys):
                                 created once, never replaced
    keys/<owner>/<key id>.json   a further key of the owner (one an older dn made unescrowed)
    keys/destroyed/<owner>.json  tombstone of crypto-shredded keys (ids only)
    audit-witness/<seq>-<hash>.json  the audit chain's signed head, one new file per witness (dn.audit)

Uploads stream: the caller writes ciphertext as it is produced, the store writes it to a temp
name and renames it after the transfer is complete, so an interrupted run leaves no artifact and
no manifest — it is never listed as a backup, and ``prune`` removes the leftovers.

Connecting retries with exponential backoff (``backup.retries``); an unknown or changed host key
and a refused key are never retried. Losing the connection mid-way raises Unreachable.
"""
from __future__ import annotations

import json
import os
import posixpath
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Callable, TypeVar

from dn.backup.manifest import ID_RE, MANIFEST_NAME, Manifest, id_time
from dn.errors import ConfigError, DnError, HostKeyError, OperationFailed, Unreachable

if TYPE_CHECKING:
    from dn.config import BackupTarget

T = TypeVar("T")
WRITE_BLOCK = 1 << 20
READ_WINDOW = 8 << 20
BACKOFF_CAP = 60.0
DRILL_MARK = "drill.json"
OFFLINE_MARK = "offline.json"  # where and when the monthly offline copy of this backup was made
KEYS_DIR = "keys"


def fatal_errors() -> tuple[type[BaseException], ...]:
    """Errors that waiting does not fix: host key, refused key, configuration."""
    from dn.ssh import AuthRefused

    return (HostKeyError, AuthRefused, ConfigError)


def retrying(
    fn: Callable[[], T],
    *,
    retries: int,
    backoff: float,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[int, float, DnError], None] | None = None,
) -> T:
    """Call ``fn``; on Unreachable retry up to ``retries`` times, waiting backoff·2^n seconds
    (at most a minute). Host key, authentication and configuration errors are not retried.
    After the last attempt the Unreachable error says how often it was tried.
    """
    fatal = fatal_errors()
    attempt = 0
    while True:
        try:
            return fn()
        except fatal:
            raise
        except Unreachable as e:
            if e.where == "database":  # only the backup region is retried here
                raise
            if attempt >= retries:
                if attempt:
                    raise Unreachable(
                        f"{what}: {e.message} (gave up after {attempt + 1} attempts)",
                        hint=e.hint or "check the backup region and rerun",
                        runbook="disaster-recovery#the-backup-region-is-unreachable",
                    ) from None
                raise
            wait = min(BACKOFF_CAP, backoff * (2 ** attempt))
            if on_retry:
                on_retry(attempt + 1, wait, e)
            sleep(wait)
            attempt += 1


@dataclass(frozen=True)
class Listing:
    """One backup directory as found in the store."""

    id: str
    created: datetime
    manifest: Manifest | None  # None: incomplete upload
    drill: dict | None = None  # the last drill's verdict, if any
    error: str | None = None  # the manifest exists but cannot be read
    offline: dict | None = None  # the last offline copy made of it (dn backup offline), if any

    @property
    def complete(self) -> bool:
        return self.manifest is not None


class _Writer:
    """A file being uploaded: bytes go to ``.<name>.part``; :meth:`finish` renames it."""

    def __init__(self, store: "Store", directory: str, name: str) -> None:
        self.store = store
        self.final = f"{directory}/{name}"
        self.tmp = f"{directory}/.{name}.part"
        self._f = store._do(f"creating {self.tmp}", store.sftp.open, self.tmp, "wb")
        # pipelined: writes do not wait for each acknowledgement; errors surface at close
        self._f.set_pipelined(True)
        self._buf = bytearray()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._buf += data
        self.size += len(data)
        if len(self._buf) >= WRITE_BLOCK:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            self.store._do(f"writing {self.tmp}", self._f.write, bytes(self._buf))
            self._buf = bytearray()

    def finish(self) -> None:
        self._flush()
        self.store._do(f"finishing {self.tmp}", self._f.close)
        st = self.store._do(f"checking {self.tmp}", self.store.sftp.stat, self.tmp)
        if st.st_size != self.size:
            raise OperationFailed(
                f"{self.store.where}: {self.tmp} holds {st.st_size} bytes after upload, {self.size} were sent"
            )
        self.store._do(f"renaming {self.tmp}", self.store.sftp.posix_rename, self.tmp, self.final)

    def abort(self) -> None:
        try:
            self._f.close()
        except Exception:  # the connection may be gone; the leftover is pruned later
            pass
        self.store._quiet_remove(self.tmp)


class _Reader:
    """Sequential reads of a remote file with bounded read-ahead (memory stays flat).

    A thread fetches the next window while the caller consumes the current one; at most three
    windows are held at once, whatever the file size.
    """

    def __init__(self, store: "Store", path: str) -> None:
        self.store = store
        self.path = path
        st = store._do(f"opening {path}", store.sftp.stat, path)
        self.size = st.st_size
        self._f = store._do(f"opening {path}", store.sftp.open, path, "rb")
        self._q: queue.Queue = queue.Queue(maxsize=2)
        self._stop = threading.Event()
        self._cur = memoryview(b"")
        self._eof = False
        self._t = threading.Thread(target=self._fetch, name="dn-backup-read", daemon=True)
        self._t.start()

    def _fetch(self) -> None:
        off = 0
        try:
            while off < self.size and not self._stop.is_set():
                n = min(READ_WINDOW, self.size - off)
                block = next(self._f.readv([(off, n)]))
                if not block:
                    break
                off += len(block)
                self._q.put(block)
            self._q.put(b"")
        except BaseException as e:  # handed to the reading thread, which raises it
            self._q.put(e)

    def read(self, n: int) -> bytes:
        while not self._cur and not self._eof:
            item = self._q.get()
            if isinstance(item, BaseException):
                self._eof = True
                self.store._raise_for(f"reading {self.path}", item)
            if not item:
                self._eof = True
            self._cur = memoryview(item)
        out = bytes(self._cur[:n])
        self._cur = self._cur[n:]
        return out

    def close(self) -> None:
        self._stop.set()
        while self._t.is_alive():
            try:
                self._q.get(timeout=0.1)
            except queue.Empty:
                pass
        try:
            self._f.close()
        except Exception:  # closing after a lost connection
            pass


class Store:
    """An open connection to the backup region; use as a context manager."""

    def __init__(self, target: "BackupTarget", session) -> None:
        self.target = target
        self.root = target.path.rstrip("/") or "/"
        self.session = session
        self.where = f"backup region {target.region} ({target.user}@{target.address})"

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        target: "BackupTarget",
        *,
        retries: int | None = None,
        backoff: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
        on_retry: Callable[[int, float, DnError], None] | None = None,
    ) -> "Store":
        from dn import ssh

        def attempt() -> Store:
            session = ssh.connect(target)
            try:
                store = cls(target, session)
                store._do("opening SFTP", lambda: store.sftp)
                store._mkdir(store.root)
                return store
            except BaseException:
                session.close()
                raise

        return retrying(attempt, retries=target.retries if retries is None else retries, backoff=backoff, sleep=sleep, on_retry=on_retry,
                        what=f"backup region {target.region} ({target.user}@{target.address})")

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    @property
    def sftp(self):
        return self.session.sftp

    # -- error translation (paramiko stays inside dn.ssh; we only see its exceptions) ----------
    def _raise_for(self, doing: str, e: BaseException):
        if isinstance(e, DnError):
            raise e
        if not self.session.active or isinstance(e, EOFError):
            raise Unreachable(f"{self.where}: lost the connection while {doing} ({type(e).__name__})",
                              hint="check the backup region and rerun; nothing partial is ever listed as a backup",
                              runbook="disaster-recovery#the-backup-region-is-unreachable") from None
        if isinstance(e, FileNotFoundError):
            raise OperationFailed(f"{self.where}: {doing}: no such file") from None
        if isinstance(e, PermissionError):
            raise OperationFailed(f"{self.where}: {doing}: permission denied") from None
        detail = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise OperationFailed(f"{self.where}: {doing}: {detail}") from None

    def _do(self, doing: str, fn: Callable, *args):
        try:
            return fn(*args)
        except Exception as e:
            self._raise_for(doing, e)

    def _quiet_remove(self, path: str) -> None:
        try:
            self.sftp.remove(path)
        except Exception:  # best effort: prune removes what is left
            pass

    def _path(self, *parts: str) -> str:
        for p in parts:
            if not p or "/" in p or p in (".", ".."):
                raise ValueError(f"bad path component {p!r}")
        return posixpath.join(self.root, *parts)

    def _exists(self, path: str) -> bool:
        try:
            self.sftp.stat(path)
            return True
        except FileNotFoundError:
            return False
        except Exception as e:
            self._raise_for(f"checking {path}", e)

    def _mkdir(self, path: str) -> None:
        if not self._exists(path):
            self._do(f"creating {path}", self.sftp.mkdir, path, 0o700)

    def _put_small(self, path: str, data: bytes) -> None:
        d, name = posixpath.split(path)
        w = _Writer(self, d, name)
        try:
            w.write(data)
            w.finish()
        except BaseException:
            w.abort()
            raise

    def _get_small(self, path: str, limit: int = 4 << 20) -> bytes:
        def read() -> bytes:
            with self.sftp.open(path, "rb") as f:
                data = f.read(limit + 1)
            if len(data) > limit:
                raise OperationFailed(f"{self.where}: {path} is larger than {limit} bytes")
            return data
        return self._do(f"reading {path}", read)

    # -- uploads -----------------------------------------------------------------------------
    def begin(self, backup_id: str) -> "Upload":
        if not ID_RE.fullmatch(backup_id):
            raise ValueError(f"not a backup id: {backup_id!r}")
        d = self._path(backup_id)
        self._do(f"creating {d}", self.sftp.mkdir, d, 0o700)
        return Upload(self, backup_id, d)

    # -- listing and reading -----------------------------------------------------------------
    def list(self) -> list[Listing]:
        """Every backup directory, oldest first; incomplete ones have ``manifest=None``."""
        names = self._do(f"listing {self.root}", self.sftp.listdir, self.root)
        out = []
        for name in sorted(n for n in names if ID_RE.fullmatch(n)):
            out.append(self._listing(name))
        return out

    def _listing(self, backup_id: str) -> Listing:
        mpath = self._path(backup_id, MANIFEST_NAME)
        if not self._exists(mpath):
            return Listing(backup_id, id_time(backup_id), None)
        try:
            m = Manifest.from_json(self._get_small(mpath), f"{self.where}: {mpath}")
        except OperationFailed as e:
            if isinstance(e, Unreachable):
                raise
            return Listing(backup_id, id_time(backup_id), None, error=e.message)
        if m.id != backup_id:
            return Listing(backup_id, id_time(backup_id), None, error=f"manifest names backup {m.id}")
        marks = {}
        for mark in (DRILL_MARK, OFFLINE_MARK):
            mpath = self._path(backup_id, mark)
            if self._exists(mpath):
                try:
                    marks[mark] = json.loads(self._get_small(mpath, 1 << 20))
                except ValueError:
                    marks[mark] = {"ok": False, "error": f"unreadable {mark} record"}
        return Listing(backup_id, m.snapshot_at, m, marks.get(DRILL_MARK), offline=marks.get(OFFLINE_MARK))

    def manifest(self, backup_id: str) -> Manifest:
        lst = self._listing(backup_id)
        if lst.manifest is None:
            if lst.error:
                raise OperationFailed(f"backup {backup_id}: {lst.error}")
            if self._exists(self._path(backup_id)):
                raise OperationFailed(f"backup {backup_id} is incomplete (its upload never finished)",
                                      hint="use another backup; `dn backup prune` removes it")
            raise OperationFailed(f"no backup {backup_id} in {self.where}", hint="see `dn backup list`")
        return lst.manifest

    def open_artifact(self, backup_id: str, name: str) -> _Reader:
        return _Reader(self, self._path(backup_id, name))

    def artifact_size(self, backup_id: str, name: str) -> int:
        return self._do(f"checking {name}", self.sftp.stat, self._path(backup_id, name)).st_size

    def record_drill(self, backup_id: str, verdict: dict) -> None:
        self._put_small(self._path(backup_id, DRILL_MARK), json.dumps(verdict, sort_keys=True).encode())

    def record_offline(self, backup_id: str, record: dict) -> None:
        self._put_small(self._path(backup_id, OFFLINE_MARK), json.dumps(record, sort_keys=True).encode())

    def manifest_bytes(self, backup_id: str) -> bytes:
        """The manifest exactly as stored (its MAC covers these bytes' content)."""
        return self._get_small(self._path(backup_id, MANIFEST_NAME))

    # -- removal -----------------------------------------------------------------------------
    def remove(self, backup_id: str) -> None:
        """Remove a backup: the manifest first, so a half-removed backup is never listed."""
        d = self._path(backup_id)
        names = self._do(f"listing {d}", self.sftp.listdir, d)
        if MANIFEST_NAME in names:
            self._do(f"removing {d}/{MANIFEST_NAME}", self.sftp.remove, f"{d}/{MANIFEST_NAME}")
        for n in names:
            if n != MANIFEST_NAME:
                self._do(f"removing {d}/{n}", self.sftp.remove, f"{d}/{n}")
        self._do(f"removing {d}", self.sftp.rmdir, d)

    # -- key escrow --------------------------------------------------------------------------
    # Escrowed key files are created exclusively and never replaced or rewritten: the escrow is
    # the authority on an owner's keys (dn.backup.run.obtain_key), so two installations that
    # both make an owner's first key agree on the one escrowed first.
    def _key_path(self, owner: str, key_id: str | None = None) -> str:
        return self._path(KEYS_DIR, f"{owner}.json") if key_id is None else self._path(KEYS_DIR, owner, f"{key_id}.json")

    def create_key(self, owner: str, raw: bytes, key_id: str | None = None) -> bool:
        """Escrow ``raw`` as ``keys/<owner>.json`` (or, for a further key, ``keys/<owner>/<key_id>.json``)
        unless that file exists: True if this call created it, False if it was there already.

        The file is uploaded under a temporary name, then renamed with the SFTP rename, which
        (unlike posix-rename) never replaces an existing file: the escrow is complete or absent."""
        d = self._path(KEYS_DIR) if key_id is None else self._path(KEYS_DIR, owner)
        self._mkdir(self._path(KEYS_DIR))
        self._mkdir(d)
        final = self._key_path(owner, key_id)
        if self._exists(final):
            return False
        name = posixpath.basename(final)
        w = _Writer(self, d, f"{name}.{secrets.token_hex(4)}")
        try:
            w.write(raw)
            w._flush()
            self._do(f"finishing {w.tmp}", w._f.close)
        except BaseException:
            w.abort()
            raise
        try:
            self.sftp.rename(w.tmp, final)
            created = True
        except OSError:
            created = False
        finally:
            self._quiet_remove(w.tmp)
        if not created and not self._exists(final):
            raise OperationFailed(f"{self.where}: could not escrow {final}")
        return created

    def get_key(self, owner: str) -> bytes | None:
        """The escrowed keys of ``owner`` as one keystore file (``keys/<owner>.json`` with any
        further key merged in), or None when none is escrowed."""
        from dn.backup import keys

        raws = []
        p = self._key_path(owner)
        if self._exists(p):
            raws.append(self._get_small(p))
        d = self._path(KEYS_DIR, owner)
        if self._exists(d):
            for n in sorted(self._do(f"listing {d}", self.sftp.listdir, d)):
                if n.endswith(".json") and not n.startswith("."):
                    raws.append(self._get_small(f"{d}/{n}"))
        return keys.merged(owner, raws)

    def key_files(self, owner: str) -> list[str]:
        """Every escrow file of ``owner`` (uploads cut short included): the evidence a shredding
        is checked against."""
        out = [self._key_path(owner)] if self._exists(self._key_path(owner)) else []
        kd = self._path(KEYS_DIR)
        if self._exists(kd):
            out += [f"{kd}/{n}" for n in self._do(f"listing {kd}", self.sftp.listdir, kd)
                    if n.startswith(f".{owner}.json.")]
        d = self._path(KEYS_DIR, owner)
        if self._exists(d):
            out += [f"{d}/{n}" for n in self._do(f"listing {d}", self.sftp.listdir, d)]
        return sorted(out)

    def key_destroyed(self, owner: str) -> bool:
        """Whether the escrow holds a tombstone for ``owner`` (its keys were crypto-shredded)."""
        return self._exists(self._path(KEYS_DIR, "destroyed", f"{owner}.json"))

    def destroy_key(self, owner: str, tombstone: bytes) -> None:
        """Record the tombstone, then remove every escrowed key file of ``owner`` (same order as
        the local keystore)."""
        self._mkdir(self._path(KEYS_DIR))
        self._mkdir(self._path(KEYS_DIR, "destroyed"))
        self._put_small(self._path(KEYS_DIR, "destroyed", f"{owner}.json"), tombstone)
        for p in self.key_files(owner):
            self._do(f"removing {p}", self.sftp.remove, p)
        d = self._path(KEYS_DIR, owner)
        if self._exists(d):
            self._do(f"removing {d}", self.sftp.rmdir, d)

    # -- append-only records (the audit log's witnesses) -------------------------------------
    def records(self, directory: str) -> list[str]:
        """The names of the files in ``directory`` (none when it does not exist yet)."""
        d = self._path(directory)
        if not self._exists(d):
            return []
        return sorted(n for n in self._do(f"listing {d}", self.sftp.listdir, d) if not n.startswith("."))

    def read_record(self, directory: str, name: str, limit: int = 1 << 16) -> bytes:
        return self._get_small(self._path(directory, name), limit)

    def add_record(self, directory: str, name: str, data: bytes) -> bool:
        """Write the new file ``directory/name``; an existing one is never replaced (False then)."""
        d = self._path(directory)
        self._mkdir(d)
        final = self._path(directory, name)
        if self._exists(final):
            return False
        tmp = self._path(directory, f".{name}.{os.getpid()}.part")

        def write() -> None:
            with self.sftp.open(tmp, "wb") as f:
                f.write(data)
        self._do(f"writing {tmp}", write)
        try:
            # SFTP's plain rename (unlike posix-rename) refuses an existing target.
            self._do(f"renaming {tmp}", self.sftp.rename, tmp, final)
        except OperationFailed:
            self._quiet_remove(tmp)
            if not self._exists(final):
                raise
            return False
        return True

    def destroyed_key_ids(self) -> dict[str, str]:
        d = self._path(KEYS_DIR, "destroyed")
        if not self._exists(d):
            return {}
        out: dict[str, str] = {}
        for n in self._do(f"listing {d}", self.sftp.listdir, d):
            if not n.endswith(".json"):
                continue
            try:
                doc = json.loads(self._get_small(f"{d}/{n}", 1 << 20))
                for kid in doc.get("key_ids", []):
                    out[kid] = doc.get("owner", n[:-5])
            except (ValueError, AttributeError):
                continue
        return out


class Upload:
    """One backup being uploaded. Artifacts first, :meth:`commit` writes the manifest last."""

    def __init__(self, store: Store, backup_id: str, directory: str) -> None:
        self.store = store
        self.id = backup_id
        self.dir = directory
        self._open: _Writer | None = None

    def artifact(self, name: str) -> _Writer:
        if "/" in name or name.startswith(".") or name == MANIFEST_NAME:
            raise ValueError(f"bad artifact name {name!r}")
        self._open = _Writer(self.store, self.dir, name)
        return self._open

    def commit(self, manifest: Manifest) -> None:
        if manifest.id != self.id:
            raise ValueError("manifest of another backup")
        for a in manifest.artifacts:
            size = self.store.artifact_size(self.id, a.name)
            if size != a.size:
                raise OperationFailed(f"{self.store.where}: {self.id}/{a.name} is {size} bytes, the manifest says {a.size}")
        self.store._put_small(f"{self.dir}/{MANIFEST_NAME}", manifest.to_json())

    def abort(self) -> None:
        """Best effort: remove what was uploaded. Whatever stays has no manifest and is never listed."""
        if self._open is not None:
            self._open.abort()
        try:
            for n in self.store.sftp.listdir(self.dir):
                self.store._quiet_remove(f"{self.dir}/{n}")
            self.store.sftp.rmdir(self.dir)
        except Exception:  # connection gone: prune removes the directory later
            pass
