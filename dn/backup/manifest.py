"""The manifest of a backup: what it holds and how to check it.

One JSON document per backup, uploaded last (its presence is what makes a backup exist):
snapshot time and source database, per-table row counts taken in the same snapshot as the dump,
and for every artifact its stored (ciphertext) and plaintext size and SHA-256, plus the id of the
data key that encrypted it. A MAC over the canonical JSON, keyed from that data key, lets a drill
or restore reject a manifest that was edited or swapped in the second region.

Backup ids sort by time: ``YYYYMMDDTHHMMSSZ-<6 hex>`` (UTC snapshot time, random suffix).

Pure: pydantic and the standard library.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from datetime import datetime, timezone
from typing import Literal

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dn.config import NAME_RE
from dn.errors import InvalidInput, OperationFailed

FORMAT = "dn-backup/1"
MANIFEST_NAME = "manifest.json"
ID_RE = re.compile(r"^(\d{8}T\d{6}Z)-([0-9a-f]{6})$")
ARTIFACT_RE = r"^[a-z0-9][a-z0-9._-]{0,120}\.enc$"
_MAC_INFO = b"dn-backup/1 manifest mac"


def new_backup_id(at: datetime) -> str:
    return f"{at.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}-{os.urandom(3).hex()}"


def check_backup_id(value: str, field: str = "backup") -> str:
    if not ID_RE.fullmatch(value or ""):
        raise InvalidInput(field, f"{value!r} is not a backup id (YYYYMMDDTHHMMSSZ-xxxxxx, as `dn backup list` shows)")
    return value


def id_time(backup_id: str) -> datetime:
    """The UTC time encoded in a backup id."""
    m = ID_RE.fullmatch(backup_id)
    if not m:
        raise ValueError(f"not a backup id: {backup_id!r}")
    return datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Artifact(_M):
    name: str = Field(pattern=ARTIFACT_RE)
    kind: Literal["pg_dump-custom", "copy-binary"]
    table: str | None = None  # copy-binary artifacts: the table whose rows they hold
    size: int = Field(ge=0)  # as stored (ciphertext)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    plain_size: int = Field(ge=0)
    plain_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Source(_M):
    database: str
    server: str  # user@host:port/db, no password ever
    server_version: str
    schema_version: int | None = None  # highest applied migration


class KeyRef(_M):
    owner: str = Field(pattern=r"^(platform|tenant-[a-z][a-z0-9-]{0,30}[a-z0-9](\.[1-9][0-9]{0,18}-[0-9a-f]{8})?)$")
    id: str = Field(pattern=r"^[0-9a-f]{32}$")


class Manifest(_M):
    format: Literal["dn-backup/1"] = FORMAT
    id: str
    kind: Literal["platform", "tenant"]
    tenant: str | None = None
    snapshot_at: datetime  # the database's clock when the snapshot was taken
    finished_at: datetime
    snapshot_id: str
    source: Source
    tables: dict[str, int]  # "schema.table" -> rows, counted in the dump's snapshot
    artifacts: list[Artifact] = Field(min_length=1)
    key: KeyRef
    tool: dict[str, str] = Field(default_factory=dict)
    mac: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not ID_RE.fullmatch(v):
            raise ValueError("not a backup id")
        return v

    @field_validator("snapshot_at", "finished_at")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("must carry a time zone")
        return v.astimezone(timezone.utc)

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        if (self.kind == "tenant") != (self.tenant is not None):
            raise ValueError("tenant is set exactly when kind is 'tenant'")
        if self.tenant is not None and not re.fullmatch(NAME_RE, self.tenant):
            raise ValueError(f"tenant must match {NAME_RE}")
        expected_owner = "platform" if self.tenant is None else f"tenant-{self.tenant}"
        if self.key.owner.split(".")[0] != expected_owner:  # tenant-<slug>.<id>-<stamp> (older: the slug alone)
            raise ValueError(f"key owner must be {expected_owner}")
        names = [a.name for a in self.artifacts]
        if len(set(names)) != len(names):
            raise ValueError("artifact names must be unique")
        for a in self.artifacts:
            if a.kind == "copy-binary" and a.table not in self.tables:
                raise ValueError(f"artifact {a.name} holds table {a.table!r}, which is not in tables")
        if any(n < 0 for n in self.tables.values()):
            raise ValueError("row counts cannot be negative")
        return self

    # -- derived -----------------------------------------------------------------------------
    @property
    def series(self) -> str:
        """Backups of the same series are retained together: ``platform`` or the tenant's key
        owner, ``tenant-<slug>.<id>-<stamp>`` (a later tenant under the same slug is a new series)."""
        return self.key.owner

    @property
    def size(self) -> int:
        return sum(a.size for a in self.artifacts)

    def artifact(self, name: str) -> Artifact:
        for a in self.artifacts:
            if a.name == name:
                return a
        raise KeyError(name)

    def context(self, artifact: str) -> bytes:
        """The encryption context binding an artifact to this backup."""
        return f"{self.id}/{artifact}".encode()

    # -- (de)serialisation -------------------------------------------------------------------
    def canonical(self) -> bytes:
        """The bytes the MAC covers: sorted-key compact JSON of everything but the MAC."""
        doc = self.model_dump(mode="json", exclude={"mac"})
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> "Manifest":
        try:
            return cls.model_validate_json(raw)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(x) for x in first["loc"]) or "(document)"
            raise OperationFailed(f"{where}: not a valid {FORMAT} manifest: {loc}: {first['msg']}") from None

    # -- authentication ----------------------------------------------------------------------
    @staticmethod
    def _mac_key(data_key: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_MAC_INFO).derive(data_key)

    def signed(self, data_key: bytes) -> "Manifest":
        mac = hmac.new(self._mac_key(data_key), self.canonical(), hashlib.sha256).hexdigest()
        return self.model_copy(update={"mac": mac})

    def verify(self, data_key: bytes) -> None:
        """Raise unless the MAC matches (an edited, forged or swapped manifest)."""
        want = hmac.new(self._mac_key(data_key), self.canonical(), hashlib.sha256).hexdigest()
        if not self.mac or not hmac.compare_digest(want, self.mac):
            raise OperationFailed(
                f"manifest of backup {self.id} fails authentication: it was changed after the backup was made",
                hint="do not use this backup; investigate who can write to the backup region",
                runbook="incident-response",
            )
