"""Backup data keys: one per tenant and one for the platform, kept outside the backed-up database.

A tenant's backups are encrypted with the tenant's own data key, so destroying that key
(:func:`KeyStore.destroy`, "crypto-shredding") makes every copy of those backups unreadable,
including copies dn can no longer reach. Platform backups use the ``platform`` key.

A tenant's key belongs to the tenant's identity, not its slug: its owner is
``tenant-<slug>.<tenant id>-<stamp>`` (:func:`owner_for`), so a tenant created later under a
reused slug gets a key (and a backup series, :attr:`dn.backup.manifest.Manifest.series`) of its
own. ``tenant-<slug>`` (no id) is the owner name dn used before; such keys are still read (old
backups restore) and are shredded with the slug's tenant, but never used for a new backup.

Keystore layout, under ``<data_dir>/backup-keys/`` (directory 0700, files 0600)::

    <owner>.json            owner = "platform", "tenant-<slug>.<id>-<stamp>" (or the old "tenant-<slug>")
    destroyed/<owner>.json  tombstone: which key ids were destroyed and when (no key material)

Each ``<owner>.json`` holds that owner's keys, each wrapped (AES-256-GCM) with a key encryption
key derived from dn's secrets passphrase by scrypt with a per-file salt (a record merged in from
another file carries that file's ``kdf``). The key new backups use is the last one. A wrapped
file is safe to keep next to the backups in the second region: the escrow there is the
authority (:func:`dn.backup.run.obtain_key` escrows a key before its first use and never
replaces an escrowed one), this keystore a cache of it, so a lost EU host does not take the keys
with it: the passphrase alone unlocks them again.

Pure: filesystem and ``cryptography`` only.
"""
from __future__ import annotations

import base64
import hashlib
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
_OWNER_RE = re.compile(r"^(platform|tenant-" + NAME_RE[1:-1] + r"(\.[1-9][0-9]{0,18}-[0-9a-f]{8})?)$")


class KeystoreError(OperationFailed):
    default_runbook = "disaster-recovery#keys-and-passphrase"


def check_tenant(tenant: str) -> str:
    """``tenant`` if it is a tenant slug, else InvalidInput naming the rule."""
    if not re.fullmatch(NAME_RE, tenant or ""):
        raise InvalidInput("tenant", f"{tenant!r} must match {NAME_RE}")
    return tenant


def owner_for(tenant: str | None, tenant_id: int | None = None, created_at: datetime | None = None) -> str:
    """The key owner of a tenant's backups, ``tenant-<slug>.<id>-<stamp>``, or ``platform``.

    The identity is the registry row: its immutable id and creation time (``stamp``: 8 hex of
    their SHA-256), required for a tenant. A slug alone names whoever holds it now, not the
    customer whose data the key protects; the id alone may be handed out again after the
    database is restored from an older backup.
    """
    if tenant is None:
        return PLATFORM
    check_tenant(tenant)
    if isinstance(tenant_id, bool) or not isinstance(tenant_id, int) or tenant_id < 1:
        raise InvalidInput("tenant id", f"a positive integer is required for tenant {tenant!r}'s key owner")
    if not isinstance(created_at, datetime) or created_at.tzinfo is None:
        raise InvalidInput("tenant created_at", f"a time with a zone is required for tenant {tenant!r}'s key owner")
    when = created_at.astimezone(timezone.utc).isoformat(timespec="microseconds")
    stamp = hashlib.sha256(f"{tenant_id}|{when}".encode()).hexdigest()[:8]
    return f"tenant-{tenant}.{tenant_id}-{stamp}"


def legacy_owner(tenant: str) -> str:
    """The owner name older dn gave a tenant's key (its slug alone): read, shredded, never used anew."""
    return f"tenant-{check_tenant(tenant)}"


def check_owner(owner: str) -> str:
    if not _OWNER_RE.fullmatch(owner):
        raise InvalidInput("key owner", f"{owner!r} must be 'platform' or 'tenant-<slug>.<id>-<stamp>'")
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
        """Install an escrowed keystore file for ``owner``: every key it holds that is not here
        yet is added, and its newest key becomes the one new backups use.

        The file must unwrap with this keystore's passphrase, so a damaged or foreign copy is
        refused before anything is written. Keys only ever added, never removed (destroy does).
        """
        doc = self._parse(owner, raw, f"escrow copy of {owner}")
        for rec in doc["keys"]:
            self._unwrap(owner, doc, rec)
        if self.is_destroyed(owner):
            raise KeystoreError(f"the keys of {owner} were destroyed (crypto-shredded); not installing a copy",
                                hint="a deleted tenant's keys are never brought back")
        self._ensure_dir()
        local = self._load(owner)
        if local is None:
            try:
                write_atomic(self._path(owner), raw, exclusive=True)
                return
            except FileExistsError:  # written meanwhile by another process: merge into that one
                local = self._load(owner)
        theirs = [dict(r, kdf=r.get("kdf") or doc["kdf"]) for r in doc["keys"]]
        ids = {r["id"] for r in theirs}
        mine = [r for r in local["keys"] if r["id"] not in ids]
        merged = mine + [r if r["kdf"] != local["kdf"] else {k: v for k, v in r.items() if k != "kdf"} for r in theirs]
        if merged != local["keys"]:
            write_atomic(self._path(owner), json.dumps({**local, "keys": merged}, indent=1).encode())

    def unescrowed(self, owner: str, escrowed: bytes | None) -> list[tuple[str, bytes]]:
        """The keys of ``owner`` held here and not in the escrow copy ``escrowed``, each as a
        keystore file of its own (key id, file): what an older dn made without escrowing it."""
        doc = self._load(owner)
        if doc is None:
            return []
        known = set(key_ids_of(escrowed)) if escrowed else set()
        return [(r["id"], json.dumps({**doc, "keys": [dict(r, kdf=r.get("kdf") or doc["kdf"])]}, indent=1).encode())
                for r in doc["keys"] if r["id"] not in known]

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
            key = AESGCM(self._kek(rec.get("kdf") or doc["kdf"])).decrypt(blob[:12], blob[12:], self._ad(owner, rec["id"]))
        except InvalidTag:
            raise KeystoreError(
                f"keystore {owner}: the secrets passphrase does not unlock key {rec.get('id')}",
                hint="check $DN_PASSPHRASE / secrets.passphrase_file: is it the passphrase the keys were made with?",
            ) from None
        except (KeyError, ValueError, TypeError):
            raise KeystoreError(f"keystore {owner}: malformed key record") from None
        return DataKey(owner, bytes.fromhex(rec["id"]), key, rec.get("created", ""))

    # -- keys --------------------------------------------------------------------------------
    def current(self, owner: str) -> DataKey:
        """The key of ``owner`` that new backups use (the last one). Never made here: a backup
        obtains it through :func:`dn.backup.run.obtain_key`, which escrows a new key before its
        first use or fetches the escrowed one."""
        if self.is_destroyed(owner):
            raise KeystoreError(f"the keys of {owner} were destroyed (crypto-shredded)",
                                hint="a deleted tenant gets no new backups")
        doc = self._load(owner)
        if doc is None or not doc["keys"]:
            raise KeystoreError(f"no backup key for {owner} in {self.dir}")
        return self._unwrap(owner, doc, doc["keys"][-1])

    def fresh(self, owner: str) -> bytes:
        """A new keystore file for ``owner`` holding one new key, written nowhere yet (it is
        escrowed first, then installed here with :meth:`import_wrapped`)."""
        if self.is_destroyed(owner):
            raise KeystoreError(
                f"the keys of {owner} were destroyed (crypto-shredded); refusing to make new ones",
                hint="a deleted tenant gets no new backups",
            )
        kdf = {"name": "scrypt", "salt": _b64(os.urandom(16)), "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}
        key, kid = new_key(), new_key_id().hex()
        nonce = os.urandom(12)
        wrapped = nonce + AESGCM(self._kek(kdf)).encrypt(nonce, key, self._ad(owner, kid))
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        doc = {"format": FORMAT, "owner": owner, "kdf": kdf,
               "keys": [{"id": kid, "created": created, "wrapped": _b64(wrapped)}]}
        return json.dumps(doc, indent=1).encode()

    def create(self, owner: str) -> DataKey:
        """Make a key for ``owner`` here only (a keystore no backup uses: scratch and forged
        keystores). Backups never call this: their keys are escrowed first."""
        self.import_wrapped(owner, self.fresh(owner))
        return self.current(owner)

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
        # a write cut short leaves its temp file (wrapped keys too): shred those as well
        for path in [self._path(owner), *self.dir.glob(f".{owner}.json.*.tmp")]:
            self._shred_file(path)
        return ids

    def _shred_file(self, path: Path) -> None:
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

    def key_files(self, owner: str) -> list[str]:
        """Every file here that holds (or held, cut short) keys of ``owner``: the evidence a
        shredding is checked against."""
        if not self.dir.is_dir():
            return []
        return sorted(str(p) for p in [self._path(owner), *self.dir.glob(f".{owner}.json.*.tmp")] if p.exists())


def key_ids_of(raw: bytes | None) -> list[str]:
    """The key ids a keystore file lists (no passphrase needed); [] for an unreadable file."""
    try:
        return [str(k["id"]) for k in json.loads(raw).get("keys", [])] if raw else []
    except (ValueError, KeyError, TypeError, AttributeError):
        return []


def merged(owner: str, raws: Iterable[bytes]) -> bytes | None:
    """Several keystore files of ``owner`` as one (the first's keys last: it names the key new
    backups use); each record carries its file's ``kdf``. None when there is none."""
    raws = list(raws)
    docs = [KeyStore._parse(owner, raw, f"escrow copy of {owner}") for raw in raws]
    if len(docs) <= 1:
        return raws[0] if raws else None  # as stored
    first, rest = docs[0], docs[1:]
    seen = {r["id"] for r in first["keys"]}
    extra = []
    for d in rest:
        for r in d["keys"]:
            if r["id"] not in seen:
                seen.add(r["id"])
                extra.append(dict(r, kdf=r.get("kdf") or d["kdf"]))
    return json.dumps({**first, "keys": extra + first["keys"]}, indent=1).encode()


def keystore(settings, environ: Mapping[str, str]) -> KeyStore:
    """The keystore of these settings: ``<data_dir>/backup-keys``, passphrase from ``secrets``."""
    return KeyStore(Path(settings.data_dir) / "backup-keys", lambda: passphrase_from(settings.secrets, environ))
