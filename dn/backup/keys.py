"""Backup data keys: one per tenant and one for the platform, kept outside the backed-up database.

A tenant's backups are encrypted with the tenant's own data key, so destroying that key
(:func:`KeyStore.destroy`, "crypto-shredding") makes every copy of those backups unreadable,
including copies dn can no longer reach. Platform backups use the ``platform`` key.

Keystore layout, under ``<data_dir>/backup-keys/`` (directory 0700, files 0600)::

    <owner>.json            owner = "platform" or "tenant-<slug>"
    destroyed/<owner>.json  tombstone: which key ids were destroyed and when (no key material)

Each ``<owner>.json`` holds that owner's keys, newest last, each wrapped (AES-256-GCM) with a key
encryption key derived from dn's secrets passphrase by scrypt with a per-file salt. A wrapped file
is safe to keep next to the backups in the second region (the escrow copy made by the store), so a
lost EU host does not take the keys with it: the passphrase alone unlocks them again.

Pure: filesystem and ``cryptography`` only.
"""
from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from dn.backup.crypto import new_key, new_key_id
from dn.config import NAME_RE
from dn.errors import ConfigError, InvalidInput, OperationFailed
from dn.localfile import write_atomic

FORMAT = "dn-keystore/1"
PLATFORM = "platform"
# scrypt cost: 32 MiB and ~0.1 s per unlock, paid once per keystore file per process
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1
_OWNER_RE = re.compile(r"^(platform|tenant-" + NAME_RE[1:-1] + r")$")


class KeystoreError(OperationFailed):
    default_runbook = "disaster-recovery#keys-and-passphrase"


def owner_for(tenant: str | None) -> str:
    """The key owner of a tenant's backups (``tenant-<slug>``), or ``platform``."""
    if tenant is None:
        return PLATFORM
    if not re.fullmatch(NAME_RE, tenant):
        raise InvalidInput("tenant", f"{tenant!r} must match {NAME_RE}")
    return f"tenant-{tenant}"


def check_owner(owner: str) -> str:
    if not _OWNER_RE.fullmatch(owner):
        raise InvalidInput("key owner", f"{owner!r} must be 'platform' or 'tenant-<slug>'")
    return owner


def passphrase_from(secrets_cfg, environ: Mapping[str, str]) -> bytes:
    """dn's secrets passphrase: ``$<secrets.passphrase_env>`` if set, else ``secrets.passphrase_file``.

    The file must not be readable by group or others.
    """
    value = environ.get(secrets_cfg.passphrase_env)
    if value:
        return value.encode()
    path = secrets_cfg.passphrase_file
    if path is None:
        raise ConfigError(
            f"no secrets passphrase: set ${secrets_cfg.passphrase_env} or secrets.passphrase_file",
            runbook="passphrase-loss",
        )
    try:
        st = os.stat(path)
        if st.st_mode & 0o077:
            raise ConfigError(f"secrets.passphrase_file {path}: must not be readable by group or others (chmod 600)")
        value = Path(path).read_text().rstrip("\r\n")
    except FileNotFoundError:
        raise ConfigError(f"secrets.passphrase_file {path}: file not found", runbook="passphrase-loss") from None
    except OSError as e:
        raise ConfigError(f"secrets.passphrase_file {path}: cannot read: {e.strerror}") from None
    if not value:
        raise ConfigError(f"secrets.passphrase_file {path}: empty")
    return value.encode()


@dataclass(frozen=True)
class DataKey:
    owner: str
    id: bytes
    key: bytes = b""  # never printed: repr below leaves it out
    created: str = ""

    def __repr__(self) -> str:
        return f"DataKey(owner={self.owner!r}, id={self.id.hex()!r}, created={self.created!r})"


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s, validate=True)


class KeyStore:
    """The data keys under ``directory``; ``passphrase`` is asked for only when a key is unwrapped."""

    def __init__(self, directory: Path, passphrase: Callable[[], bytes]) -> None:
        self.dir = Path(directory)
        self._passphrase = passphrase
        self._keks: dict[bytes, bytes] = {}

    # -- files -------------------------------------------------------------------------------
    def _path(self, owner: str) -> Path:
        return self.dir / f"{check_owner(owner)}.json"

    def _ensure_dir(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)

    def _load(self, owner: str) -> dict | None:
        p = self._path(owner)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            return None
        return self._parse(owner, raw, str(p))

    @staticmethod
    def _parse(owner: str, raw: bytes, where: str) -> dict:
        try:
            doc = json.loads(raw)
            ok = (
                doc.get("format") == FORMAT
                and doc.get("owner") == owner
                and isinstance(doc.get("keys"), list)
                and isinstance(doc.get("kdf"), dict)
            )
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            raise KeystoreError(f"keystore file {where} is not a {FORMAT} file for {owner}")
        return doc

    def owners(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.stem for p in self.dir.glob("*.json") if _OWNER_RE.fullmatch(p.stem))

    def exported(self, owner: str) -> bytes | None:
        """The wrapped keystore file of ``owner`` as stored (safe to copy: no key in clear)."""
        try:
            return self._path(owner).read_bytes()
        except FileNotFoundError:
            return None

    def import_wrapped(self, owner: str, raw: bytes) -> None:
        """Install an escrowed keystore file for ``owner`` if none is present locally.

        The file must unwrap with this keystore's passphrase, so a damaged or foreign copy is
        refused before it is installed.
        """
        doc = self._parse(owner, raw, f"escrow copy of {owner}")
        for rec in doc["keys"]:
            self._unwrap(owner, doc, rec)
        self._ensure_dir()
        if not self._path(owner).exists():
            write_atomic(self._path(owner), raw, exclusive=True)

    # -- wrapping ----------------------------------------------------------------------------
    def _kek(self, kdf: dict) -> bytes:
        salt = _unb64(kdf["salt"])
        if salt not in self._keks:
            if kdf.get("name") != "scrypt":
                raise KeystoreError(f"unknown key derivation {kdf.get('name')!r}")
            self._keks[salt] = Scrypt(salt=salt, length=32, n=int(kdf["n"]), r=int(kdf["r"]), p=int(kdf["p"])).derive(
                self._passphrase()
            )
        return self._keks[salt]

    @staticmethod
    def _ad(owner: str, key_id: str) -> bytes:
        return f"{FORMAT}|{owner}|{key_id}".encode()

    def _unwrap(self, owner: str, doc: dict, rec: dict) -> DataKey:
        try:
            blob = _unb64(rec["wrapped"])
            key = AESGCM(self._kek(doc["kdf"])).decrypt(blob[:12], blob[12:], self._ad(owner, rec["id"]))
        except InvalidTag:
            raise KeystoreError(
                f"keystore {owner}: the secrets passphrase does not unlock key {rec.get('id')}",
                hint="check $DN_PASSPHRASE / secrets.passphrase_file: is it the passphrase the keys were made with?",
            ) from None
        except (KeyError, ValueError, TypeError):
            raise KeystoreError(f"keystore {owner}: malformed key record") from None
        return DataKey(owner, bytes.fromhex(rec["id"]), key, rec.get("created", ""))

    # -- keys --------------------------------------------------------------------------------
    def current(self, owner: str, *, create: bool = True) -> DataKey:
        """The newest key of ``owner``, created (and its file written) on first use."""
        doc = self._load(owner)
        if doc is None or not doc["keys"]:
            if not create:
                raise KeystoreError(f"no backup key for {owner} in {self.dir}")
            return self.rotate(owner)
        return self._unwrap(owner, doc, doc["keys"][-1])

    def rotate(self, owner: str) -> DataKey:
        """Add a new key for ``owner``; new backups use it, old backups keep theirs."""
        if self.is_destroyed(owner):
            raise KeystoreError(
                f"the keys of {owner} were destroyed (crypto-shredded); refusing to make new ones",
                hint="a deleted tenant gets no new backups",
            )
        self._ensure_dir()
        doc = self._load(owner)
        fresh = doc is None
        if fresh:
            doc = {
                "format": FORMAT,
                "owner": owner,
                "kdf": {"name": "scrypt", "salt": _b64(os.urandom(16)), "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P},
                "keys": [],
            }
        key, kid = new_key(), new_key_id().hex()
        nonce = os.urandom(12)
        wrapped = nonce + AESGCM(self._kek(doc["kdf"])).encrypt(nonce, key, self._ad(owner, kid))
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        doc["keys"].append({"id": kid, "created": created, "wrapped": _b64(wrapped)})
        raw = json.dumps(doc, indent=1).encode()
        try:
            write_atomic(self._path(owner), raw, exclusive=fresh)
        except FileExistsError:
            # another process made this owner's first key at the same moment: use that one
            return self.current(owner, create=False)
        return DataKey(owner, bytes.fromhex(kid), key, created)

    def lookup(self, key_id: bytes) -> bytes | None:
        """The data key with this id, from any owner, or None."""
        hid = key_id.hex()
        for owner in self.owners():
            doc = self._load(owner)
            for rec in doc["keys"] if doc else []:
                if rec.get("id") == hid:
                    return self._unwrap(owner, doc, rec).key
        return None

    def key_ids(self, owner: str) -> list[str]:
        doc = self._load(owner)
        return [r["id"] for r in doc["keys"]] if doc else []

    # -- destruction -------------------------------------------------------------------------
    def _tomb(self, owner: str) -> Path:
        return self.dir / "destroyed" / f"{check_owner(owner)}.json"

    def is_destroyed(self, owner: str) -> bool:
        return self._tomb(owner).exists()

    def destroyed_key_ids(self) -> dict[str, str]:
        """key id (hex) -> owner, for every destroyed key (from the tombstones)."""
        out: dict[str, str] = {}
        d = self.dir / "destroyed"
        for p in sorted(d.glob("*.json")) if d.is_dir() else []:
            try:
                doc = json.loads(p.read_text())
                for kid in doc.get("key_ids", []):
                    out[kid] = doc["owner"]
            except (ValueError, KeyError, OSError):
                continue
        return out

    def destroy(self, owner: str, also: Iterable[str] = ()) -> list[str]:
        """Destroy every key of ``owner``: overwrite the file, fsync, unlink; leave a tombstone.

        ``also`` adds key ids known from elsewhere (the escrow copy) to the tombstone.
        Returns the destroyed key ids. Idempotent: destroying again returns the ids recorded.
        On copy-on-write or journaled storage an old block may survive the overwrite; it still
        holds only wrapped keys, which the passphrase-derived key protects.
        """
        if owner == PLATFORM:
            raise InvalidInput("key owner", "the platform key is never destroyed")
        check_owner(owner)
        self._ensure_dir()
        ids = sorted(set(self.key_ids(owner)) | set(also))
        tomb = self._tomb(owner)
        if tomb.exists():
            ids = sorted(set(ids) | set(json.loads(tomb.read_text()).get("key_ids", [])))
        tomb.parent.mkdir(mode=0o700, exist_ok=True)
        when = datetime.now(timezone.utc).isoformat(timespec="seconds")
        # tombstone first: if we crash between the two steps, the key is marked destroyed and
        # rerunning finishes the job; never the other way round (a key gone without a record)
        write_atomic(tomb, json.dumps({"owner": owner, "key_ids": ids, "destroyed_at": when}).encode())
        path = self._path(owner)
        if path.exists():
            size = path.stat().st_size
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, os.urandom(size))
                os.fsync(fd)
            finally:
                os.close(fd)
            path.unlink()
            dfd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return ids


def keystore(settings, environ: Mapping[str, str]) -> KeyStore:
    """The keystore of these settings: ``<data_dir>/backup-keys``, passphrase from ``secrets``."""
    return KeyStore(Path(settings.data_dir) / "backup-keys", lambda: passphrase_from(settings.secrets, environ))
