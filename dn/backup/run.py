"""Backup runs, listing, pruning and crypto-shredding: the operations behind `dn backup`.

A run: take the snapshot, stream pg_dump (or the tenant's COPYs) through encryption into the
second region, count rows in the same snapshot, then commit the manifest. If the region cannot be
reached or the connection drops, the whole run is retried with exponential backoff
(``backup.retries``); a run that never committed its manifest is not a backup and is never listed.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable, Mapping

from dn.backup import crypto, dump, keys, retention
from dn.backup.manifest import Artifact, KeyRef, Manifest, Source, new_backup_id
from dn.backup.store import Listing, Store, retrying
from dn.errors import ConfigError, DnError

if TYPE_CHECKING:
    from dn.config import BackupTarget, Settings

Progress = Callable[[str], None]
Bytes = Callable[[int], None]
READ_BLOCK = 1 << 20


def _quiet(_: str) -> None:
    pass


def target_of(settings: "Settings") -> "BackupTarget":
    if settings.backup is None:
        raise ConfigError("no backup region configured: add a [backup] section (address, user, key_path, host_key, path)")
    return settings.backup


def source_dsn(settings: "Settings") -> str:
    """The owner role reads every table (the day-to-day role may not); fall back to the app DSN."""
    return settings.database.admin_dsn or settings.database.dsn


def open_store(settings: "Settings", *, retries: int | None = None, backoff: float = 1.0,
               sleep: Callable[[float], None] = time.sleep, progress: Progress = _quiet) -> Store:
    target = target_of(settings)

    def on_retry(n: int, wait: float, e: DnError) -> None:
        progress(f"backup region unreachable ({e.message}); retry {n} in {wait:.0f}s")

    return Store.open(target, retries=target.retries if retries is None else retries, backoff=backoff,
                      sleep=sleep, on_retry=on_retry)


def ensure_escrow(store: Store, ks: keys.KeyStore, owner: str) -> None:
    """Keep the wrapped keystore file of ``owner`` next to the backups, so losing this machine
    does not lose the keys (the passphrase still guards them)."""
    raw = ks.exported(owner)
    if raw is not None and store.get_key(owner) != raw:
        store.put_key(owner, raw)


def _artifact(name: str, kind: str, stats: crypto.StreamStats, table: str | None = None) -> Artifact:
    return Artifact(name=name, kind=kind, table=table, size=stats.cipher_size, sha256=stats.cipher_sha256,
                    plain_size=stats.plain_size, plain_sha256=stats.plain_sha256)


def _upload_stream(upload, name: str, dk: keys.DataKey, backup_id: str, chunks, on_bytes: Bytes) -> crypto.StreamStats:
    w = upload.artifact(name)
    enc = crypto.Encryptor(dk.key, dk.id, w.write, context=f"{backup_id}/{name}".encode())
    for block in chunks:
        enc.write(block)
        on_bytes(len(block))
    stats = enc.close()
    w.finish()
    return stats


def _read_blocks(producer: dump.Producer):
    while True:
        b = producer.read(READ_BLOCK)
        if not b:
            return
        yield b


def _backup_once(settings: "Settings", store: Store, dk: keys.DataKey, tenant: str | None,
                 progress: Progress, on_bytes: Bytes) -> Manifest:
    from dn import db

    dsn, passfile = source_dsn(settings), settings.database.passfile
    with dump.snapshot(dsn, passfile) as snap:
        bid = new_backup_id(snap.at)
        progress(f"snapshot {snap.id} of {snap.database} at {snap.at:%Y-%m-%d %H:%M:%S}Z; backup {bid}")
        upload = store.begin(bid)
        try:
            artifacts: list[Artifact] = []
            if tenant is None:
                counts: dict[str, int] = {}
                failure: list[BaseException] = []

                def count() -> None:
                    try:
                        counts.update(dump.count_rows(snap.conn, snap.tables))
                    except BaseException as e:  # re-raised in the main thread
                        failure.append(e)

                # counting runs on the snapshot connection while pg_dump streams: same snapshot,
                # and the two scans overlap instead of adding up
                producer = dump.pg_dump(dsn, passfile, snap.id)
                counter = threading.Thread(target=count, daemon=True)
                counter.start()
                try:
                    stats = _upload_stream(upload, "platform.dump.enc", dk, bid, _read_blocks(producer), on_bytes)
                    producer.finish()
                except BaseException:
                    producer.kill()
                    raise
                finally:
                    counter.join()
                if failure:
                    raise failure[0]
                artifacts.append(_artifact("platform.dump.enc", "pg_dump-custom", stats))
                tables = counts
            else:
                tid = dump.tenant_row_id(snap.conn, tenant)
                ttables = dump.tenant_tables(snap.conn, snap.tables)
                tables = {}
                for schema, name, quoted, col in ttables:
                    tables.update(dump.count_rows(snap.conn, [(schema, name, quoted)], f"WHERE {col} = %s", (tid,)))
                producer = dump.pg_dump(dsn, passfile, snap.id, schema_only=True)
                try:
                    stats = _upload_stream(upload, "schema.dump.enc", dk, bid, _read_blocks(producer), on_bytes)
                    producer.finish()
                except BaseException:
                    producer.kill()
                    raise
                artifacts.append(_artifact("schema.dump.enc", "pg_dump-custom", stats))
                for i, (schema, name, quoted, col) in enumerate(ttables):
                    art = f"data-{i:03d}.copy.enc"
                    stats = _upload_stream(upload, art, dk, bid, dump.copy_out(snap.conn, quoted, col, tid), on_bytes)
                    artifacts.append(_artifact(art, "copy-binary", stats, dump.table_key(schema, name)))
            m = Manifest(
                id=bid,
                kind="platform" if tenant is None else "tenant",
                tenant=tenant,
                snapshot_at=snap.at,
                finished_at=datetime.now(timezone.utc),
                snapshot_id=snap.id,
                source=Source(database=snap.database, server=db.describe_dsn(dsn), server_version=snap.server_version,
                              schema_version=snap.schema_version),
                tables=tables,
                artifacts=artifacts,
                key=KeyRef(owner=dk.owner, id=dk.id.hex()),
                tool={"pg_dump": dump.pg_tool("pg_dump"), "dn": _dn_version()},
            ).signed(dk.key)
            upload.commit(m)
        except BaseException:
            upload.abort()
            raise
    progress(f"backup {bid} committed: {m.size} bytes in {len(m.artifacts)} artifact(s)")
    return m


def _dn_version() -> str:
    try:
        from importlib.metadata import version

        return version("dn")
    except Exception:  # running from a checkout without metadata
        return "unknown"


def run_backup(settings: "Settings", environ: Mapping[str, str], *, tenant: str | None = None,
               progress: Progress = _quiet, on_bytes: Bytes = lambda n: None, backoff: float = 1.0,
               sleep: Callable[[float], None] = time.sleep) -> Manifest:
    """Make one backup (the platform database, or one tenant's rows) in the second region."""
    target = target_of(settings)
    owner = keys.owner_for(tenant)
    ks = keys.keystore(settings, environ)
    dk = ks.current(owner)
    platform = ks.current(keys.PLATFORM) if owner != keys.PLATFORM else dk

    def attempt() -> Manifest:
        with open_store(settings, retries=0) as store:
            ensure_escrow(store, ks, keys.PLATFORM)
            if platform is not dk:
                ensure_escrow(store, ks, owner)
            return _backup_once(settings, store, dk, tenant, progress, on_bytes)

    def on_retry(n: int, wait: float, e: DnError) -> None:
        progress(f"{e.message}; retry {n} of {target.retries} in {wait:.0f}s")

    return retrying(attempt, retries=target.retries, backoff=backoff, sleep=sleep, on_retry=on_retry,
                    what=f"backup to region {target.region}")


# -- listing and pruning -------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One backup as `dn backup list` shows it."""

    listing: Listing
    decision: retention.Decision

    def to_dict(self, now: datetime) -> dict:
        m = self.listing.manifest
        drill = self.listing.drill
        return {
            "id": self.listing.id,
            "kind": m.kind if m else None,
            "tenant": m.tenant if m else None,
            "series": self.decision.series,
            "created": self.listing.created.isoformat(),
            "age_seconds": int((now - self.listing.created).total_seconds()),
            "size": m.size if m else None,
            "tables": len(m.tables) if m else None,
            "rows": sum(m.tables.values()) if m else None,
            "tier": self.decision.tier,
            "keep": self.decision.keep,
            "reason": self.decision.reason,
            "verified": bool(drill and drill.get("ok")),
            "last_drill": drill,
            "offline": self.listing.offline,
            "key_id": m.key.id if m else None,
        }


def _series_of(lst: Listing) -> str:
    return lst.manifest.series if lst.manifest else "incomplete"


def plan(settings: "Settings", environ: Mapping[str, str], store: Store, now: datetime | None = None,
         listings: list[Listing] | None = None) -> list[Row]:
    """Every backup directory in the store with its retention decision, newest first."""
    now = now or datetime.now(timezone.utc)
    listings = store.list() if listings is None else listings
    destroyed = set(keys.keystore(settings, environ).destroyed_key_ids()) | set(store.destroyed_key_ids())
    entries = [
        retention.Entry(lst.id, _series_of(lst), lst.created, complete=lst.complete,
                        key_destroyed=bool(lst.manifest and lst.manifest.key.id in destroyed))
        for lst in listings
    ]
    r = settings.retention
    decisions = {d.id: d for d in retention.plan(entries, now, daily_days=r.backup_daily_days,
                                                  monthly_months=r.backup_monthly_months)}
    rows = [Row(lst, decisions[lst.id]) for lst in listings]
    return sorted(rows, key=lambda row: row.listing.created, reverse=True)


def prune(store: Store, rows: list[Row], *, dry_run: bool, progress: Progress = _quiet) -> list[Row]:
    """Remove the backups the plan does not keep (unless ``dry_run``); returns them."""
    doomed = [row for row in rows if not row.decision.keep]
    if not dry_run:
        for row in doomed:
            store.remove(row.listing.id)
            progress(f"removed {row.listing.id} ({row.decision.reason})")
    return doomed


# -- crypto-shredding ----------------------------------------------------------------------------
def shred(settings: "Settings", environ: Mapping[str, str], tenant: str, *, store: Store | None = None) -> dict:
    """Destroy every backup key of ``tenant`` here and in the backup region's escrow.

    After this, every backup of the tenant is unreadable wherever a copy of it lives; `dn backup
    prune` then removes them. Idempotent: run it again after a failure. Returns what was done.
    """
    owner = keys.owner_for(tenant)
    ks = keys.keystore(settings, environ)
    own = store is None
    store = store or open_store(settings)
    try:
        escrowed = store.get_key(owner)
        escrow_ids: list[str] = []
        if escrowed:
            try:
                escrow_ids = [k["id"] for k in json.loads(escrowed).get("keys", [])]
            except (ValueError, KeyError, TypeError, AttributeError):
                escrow_ids = []  # an unreadable escrow copy is removed all the same
        ids = ks.destroy(owner, also=escrow_ids)
        when = datetime.now(timezone.utc).isoformat(timespec="seconds")
        store.destroy_key(owner, json.dumps({"owner": owner, "key_ids": ids, "destroyed_at": when}).encode())
    finally:
        if own:
            store.close()
    return {"owner": owner, "key_ids": ids, "escrow_removed": escrowed is not None, "destroyed_at": when}
