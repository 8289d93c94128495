"""Platform secrets at rest: Fernet keys from the environment, MultiFernet rotation, key status.

The platform's API keys (and the other Fernet-encrypted columns the data map lists under
``encrypted``: MFA secrets, sGTM container configurations) are stored as Fernet tokens, each row
naming the key that sealed it (``fernet_key_id``). The keys come only from the environment:
``DN_FERNET_KEYS``, comma-separated, newest (primary) first — never from a configuration file or
argv. A key's id is derived from the key (``fk-`` + 12 hex digits of a SHA-256), so ids are
stable and reveal nothing.

Rotation: put a new key in front of ``DN_FERNET_KEYS`` and run `dn keys rotate`; every value not
under the primary key is re-encrypted (MultiFernet.rotate) in batches, each batch its own
transaction, so an interrupted rotation simply continues when run again. `dn keys rotate
--retire-old` then records the older keys as retired — refused while any value is still under
one — after which they can be removed from the environment; `dn keys status` (and `dn verify`)
show how many values each key id holds, so a value left under a retired key is visible.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from dn.errors import ConfigError, OperationFailed, PolicyViolation
from dn.gdpr import datamap as dmap
from dn.gdpr.sqlgen import column, ident

if TYPE_CHECKING:
    from cryptography.fernet import MultiFernet

    from dn.context import Context
    from dn.db import Connection

ENV = "DN_FERNET_KEYS"
BATCH_ROWS = 500
LOCK_TIMEOUT_MS = 5000
Progress = Callable[[str], None]


def key_id(key: bytes) -> str:
    """The public id of a Fernet key (from a one-way hash of it)."""
    return "fk-" + hashlib.sha256(b"dn fernet key id\0" + key).hexdigest()[:12]


@dataclass(frozen=True)
class Keyring:
    """The Fernet keys of the environment, primary first. Never printed: repr shows ids only."""

    keys: tuple[bytes, ...] = field(repr=False)

    @property
    def ids(self) -> list[str]:
        return [key_id(k) for k in self.keys]

    @property
    def primary_id(self) -> str:
        return key_id(self.keys[0])

    def multi(self) -> "MultiFernet":
        from cryptography.fernet import Fernet, MultiFernet

        return MultiFernet([Fernet(k) for k in self.keys])

    def encrypt(self, plaintext: bytes) -> tuple[str, str]:
        """(token, key id) sealed with the primary key."""
        return self.multi().encrypt(plaintext).decode(), self.primary_id

    def __repr__(self) -> str:
        return f"Keyring(ids={self.ids})"


def parse_keys(raw: str | None, var: str = ENV) -> Keyring:
    """The keyring from ``$DN_FERNET_KEYS``. Errors name the variable and the position, never a key."""
    if not raw or not raw.strip():
        raise ConfigError(f"${var} is not set: it holds the Fernet keys (comma-separated, newest first)",
                          hint="see `dn runbook show key-rotation`", runbook="key-rotation")
    keys = []
    for i, part in enumerate(raw.split(","), 1):
        k = part.strip().encode()
        try:
            ok = len(base64.urlsafe_b64decode(k)) == 32 and len(k) == 44
        except (binascii.Error, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"${var}: key {i} is not a Fernet key (44 characters of URL-safe base64 of 32 bytes)",
                              runbook="key-rotation")
        if k in keys:
            raise ConfigError(f"${var}: key {i} repeats an earlier key", runbook="key-rotation")
        keys.append(k)
    return Keyring(tuple(keys))


def keyring(environ: Mapping[str, str]) -> Keyring:
    return parse_keys(environ.get(ENV))


@dataclass(frozen=True)
class Column:
    table: str
    column: str
    key_id_column: str


def encrypted_columns(dm: dmap.DataMap) -> list[Column]:
    return [Column(t.name, e.column, e.key_id_column) for t in sorted(dm.tables.values(), key=lambda t: t.name)
            for e in t.encrypted]


# -- status --------------------------------------------------------------------------------------
@dataclass
class KeyStatus:
    key_id: str
    role: str  # primary | active (in the environment) | retired | unknown
    values: int
    in_environment: bool
    retired_at: str | None = None
    per_column: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Status:
    keys: list[KeyStatus]
    unsealed: int  # values with no key id recorded

    @property
    def under_retired(self) -> int:
        return sum(k.values for k in self.keys if k.role == "retired")

    @property
    def problems(self) -> list[str]:
        out = []
        for k in self.keys:
            if k.role == "retired" and k.values:
                out.append(f"{k.values} value(s) remain under retired key {k.key_id}")
            if k.role == "retired" and k.in_environment:
                out.append(f"retired key {k.key_id} is still in ${ENV}: remove it")
            if k.role == "unknown" and k.values:
                out.append(f"{k.values} value(s) are under key {k.key_id}, which is not in ${ENV}")
        if self.unsealed:
            out.append(f"{self.unsealed} value(s) record no key id: run `dn keys rotate`")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"keys": [k.to_dict() for k in self.keys], "unsealed": self.unsealed,
                "under_retired": self.under_retired, "problems": self.problems, "ok": not self.problems}


def status(conn: "Connection", dm: dmap.DataMap, ring: Keyring | None) -> Status:
    """How many stored values are under each key id, and each id's role. ``ring`` may be None
    when the environment holds no keys (every id is then 'unknown' or 'retired')."""
    from dn import db

    counts: dict[str, dict[str, int]] = {}
    unsealed = 0
    with db.translate_errors("reading the key status"):
        for c in encrypted_columns(dm):
            q = (f"SELECT {column(c.key_id_column)} AS kid, count(*) AS n FROM {ident(c.table)} "
                 f"WHERE {column(c.column)} IS NOT NULL GROUP BY 1")
            for r in db.rows(conn, q):
                if r["kid"] is None:
                    unsealed += r["n"]
                else:
                    counts.setdefault(r["kid"], {})[f"{c.table}.{c.column}"] = r["n"]
        known = {r["key_id"]: r for r in db.rows(conn, "SELECT key_id, retired_at FROM fernet_keys")}
    env_ids = ring.ids if ring else []
    out = []
    for kid in sorted(set(counts) | set(known) | set(env_ids), key=lambda k: (k not in env_ids, env_ids.index(k) if k in env_ids else 0, k)):
        retired = known.get(kid, {}).get("retired_at")
        role = ("retired" if retired else "primary" if env_ids and kid == env_ids[0]
                else "active" if kid in env_ids else "unknown")
        per = counts.get(kid, {})
        out.append(KeyStatus(kid, role, sum(per.values()), kid in env_ids,
                             retired.isoformat() if retired else None, per))
    return Status(out, unsealed)


# -- rotation ------------------------------------------------------------------------------------
@dataclass
class RotateResult:
    primary: str
    reencrypted: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    retired: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__) | {"total": sum(self.reencrypted.values())}


def _register(conn: "Connection", ring: Keyring) -> None:
    for kid in ring.ids:
        conn.execute("INSERT INTO fernet_keys (key_id) VALUES (%s) ON CONFLICT (key_id) DO NOTHING", (kid,))
    conn.execute("UPDATE fernet_keys SET primary_since = clock_timestamp() WHERE key_id = %s AND primary_since IS NULL",
                 (ring.primary_id,))


def reencrypt(conn: "Connection", dm: dmap.DataMap, ring: Keyring, *, batch_size: int = BATCH_ROWS,
              progress: Progress = lambda s: None) -> RotateResult:
    """Re-encrypt every value not under the primary key, batch by batch (resumable)."""
    from cryptography.fernet import InvalidToken

    from dn import db

    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    multi = ring.multi()
    res = RotateResult(ring.primary_id)
    with db.translate_errors("rotating the Fernet keys"):
        retired = {r["key_id"] for r in db.rows(conn, "SELECT key_id FROM fernet_keys WHERE retired_at IS NOT NULL")}
        if ring.primary_id in retired:
            raise PolicyViolation(f"the primary key {ring.primary_id} was retired: put a new key first in ${ENV}",
                                  runbook="key-rotation")
        _register(conn, ring)
        for c in encrypted_columns(dm):
            t, col, kcol = ident(c.table), column(c.column), column(c.key_id_column)
            done = 0
            while True:
                with conn.transaction():
                    conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT_MS}ms'")
                    # dn's own maintenance passes the GDPR write guard (dn/schema/004_gdpr.sql)
                    conn.execute("SET LOCAL dn.gdpr_bypass = 'on'")
                    rows = conn.execute(
                        f"SELECT ctid, {col} FROM {t} WHERE {col} IS NOT NULL AND {kcol} IS DISTINCT FROM %s "
                        f"LIMIT {int(batch_size)} FOR UPDATE SKIP LOCKED", (ring.primary_id,)).fetchall()
                    if not rows:
                        break
                    updates = []
                    for ctid, token in rows:
                        try:
                            new = multi.rotate(token.encode()).decode()
                        except InvalidToken:
                            raise OperationFailed(
                                f"{c.table}.{c.column}: a value cannot be decrypted with any key in ${ENV} "
                                "(its key is missing or the value is damaged); nothing of this batch was changed",
                                hint="put the key that sealed it back into the environment and rerun",
                                runbook="key-rotation", where="database") from None
                        updates.append((new, ring.primary_id, ctid))
                    with conn.cursor() as cur:
                        cur.executemany(f"UPDATE {t} SET {col} = %s, {kcol} = %s WHERE ctid = %s::tid", updates)
                done += len(rows)
                res.batches += 1
                progress(f"{c.table}.{c.column}: {done} re-encrypted")
            res.reencrypted[f"{c.table}.{c.column}"] = done
    return res


def retire(conn: "Connection", dm: dmap.DataMap, ring: Keyring) -> list[str]:
    """Record every key except the primary as retired; refused while a value is under one."""
    from dn import db

    st = status(conn, dm, ring)
    left = [k for k in st.keys if k.key_id != ring.primary_id and k.values]
    if left or st.unsealed:
        what = ", ".join(f"{k.key_id} ({k.values})" for k in left) or f"{st.unsealed} without a key id"
        raise PolicyViolation(f"refusing to retire keys: values remain under {what}", hint="run `dn keys rotate` first",
                              runbook="key-rotation")
    with db.translate_errors("retiring Fernet keys"), conn.transaction():
        _register(conn, ring)
        rows = db.rows(conn, "UPDATE fernet_keys SET retired_at = clock_timestamp() "
                             "WHERE key_id <> %s AND retired_at IS NULL RETURNING key_id", (ring.primary_id,))
    return sorted(r["key_id"] for r in rows)


def rotate(ctx: "Context", *, retire_old: bool = False, batch_size: int = BATCH_ROWS,
           progress: Progress = lambda s: None) -> RotateResult:
    """`dn keys rotate`: audited, one rotation at a time (lock db:fernet-keys)."""
    from dn import audit, db

    ring = keyring(ctx.environ)
    dm = dmap.load()
    with audit.privileged(ctx, "keys rotate", {"primary_key_id": ring.primary_id, "retire_old": retire_old,
                                               "key_ids": ring.ids}, lock=["db:fernet-keys"]) as op:
        with db.connect(ctx.settings.database, application_name=f"dn keys rotate {ctx.request_id}") as conn:
            res = reencrypt(conn, dm, ring, batch_size=batch_size, progress=progress)
            # listed, not keyed by "table.column": the audit log redacts values under key-like names
            op.args["reencrypted"] = [{"table": k.split(".")[0], "column": k.split(".")[1], "values": n}
                                      for k, n in res.reencrypted.items()]
            if retire_old:
                res.retired = retire(conn, dm, ring)
                op.args["retired_key_ids"] = res.retired
    return res


def key_status(ctx: "Context") -> Status:
    """`dn keys status`: works without keys in the environment (then no id is primary)."""
    from dn import db

    raw = ctx.environ.get(ENV)
    ring = parse_keys(raw) if raw else None
    with db.connect(ctx.settings.database, application_name="dn keys status") as conn:
        return status(conn, dmap.load(), ring)
