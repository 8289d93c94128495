"""Backup runs, listing, pruning and crypto-shredding: the operations behind `dn backup`.

A run: take the snapshot, stream pg_dump (or the tenant's COPYs) through encryption into the
second region, count rows in the same snapshot, then commit the manifest. If the region cannot be
reached or the connection drops, the whole run is retried with exponential backoff
(``backup.retries``); a run that never committed its manifest is not a backup and is never listed.
"""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable, Mapping

from dn.backup import crypto, dump, keys, retention
from dn.backup.manifest import Artifact, KeyRef, Manifest, Source, new_backup_id
from dn.backup.store import Listing, Store, retrying
from dn.errors import ConfigError, DnError, OperationFailed

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


def obtain_key(store: Store, ks: keys.KeyStore, owner: str) -> keys.DataKey:
    """The key of ``owner`` that a backup uses, escrowed in the backup region before its first use.

    The escrow is the authority and is never replaced: an installation without the owner's key
    fetches it; one without any escrowed key makes one and escrows it with an exclusive create,
    and if another installation escrowed first, uses that one instead. Keys an older dn made here
    without escrowing them are escrowed beside it (``keys/<owner>/<id>.json``), so every backup
    ever made restores with the passphrase alone. A crypto-shredded owner (a tombstone here or in
    the region) gets no key: its backups cannot be started.
    """
    if ks.is_destroyed(owner) or store.key_destroyed(owner):
        raise keys.KeystoreError(f"the keys of {owner} were destroyed (crypto-shredded); no backup is made",
                                 hint="a deleted tenant gets no new backups")
    escrowed = store.get_key(owner)
    if escrowed is None:
        if ks.exported(owner) is None:
            # False when another installation escrowed first: its key is the one used below
            store.create_key(owner, ks.fresh(owner))
        else:  # made here by an older dn, never escrowed: escrow it as it is
            store.create_key(owner, ks.exported(owner))
        escrowed = store.get_key(owner)
        if escrowed is None:
            raise keys.KeystoreError(f"the key of {owner} could not be escrowed in {store.where}")
    escrow_unescrowed(store, ks, owner, escrowed)
    ks.import_wrapped(owner, escrowed)
    dk = ks.current(owner)
    if dk.id.hex() != keys.key_ids_of(escrowed)[-1]:
        raise keys.KeystoreError(f"the key of {owner} in {ks.dir} is not the escrowed one")
    return dk


def escrow_unescrowed(store: Store, ks: keys.KeyStore, owner: str, escrowed: bytes | None) -> list[str]:
    """Escrow each key of ``owner`` held here and not in the escrow (``keys/<owner>/<id>.json``,
    created once): older dn replaced the escrow file with its own, so the keys another
    installation made are only on that installation. Returns their ids."""
    done = []
    for kid, raw in ks.unescrowed(owner, escrowed):
        if escrowed is None:
            store.create_key(owner, raw)  # none escrowed yet: this file becomes the owner's first
            escrowed = store.get_key(owner)
            if kid in keys.key_ids_of(escrowed):
                done.append(kid)
                continue
        store.create_key(owner, raw, key_id=kid)
        done.append(kid)
    return done


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


def _backup_once(settings: "Settings", store: Store, dk: keys.DataKey, tenant: str | None, tenant_id: int | None,
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
                if tid != tenant_id:  # the slug changed hands since the key was chosen
                    raise OperationFailed(f"tenant {tenant} is no longer registry row {tenant_id} (it was "
                                          "destroyed and the slug reused meanwhile); nothing was backed up",
                                          where=f"tenant:{tenant}")
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


@dataclass(frozen=True)
class TenantRow:
    """The registry row holding a slug now: its identity (id, creation time) and status."""

    id: int
    slug: str
    created_at: datetime
    status: str

    @property
    def owner(self) -> str:
        """The key owner (and backup series) of this tenant's backups."""
        return keys.owner_for(self.slug, self.id, self.created_at)


def tenant_row(settings: "Settings", tenant: str) -> TenantRow | None:
    """The tenant holding the slug ``tenant`` now, or None."""
    from dn import db

    keys.check_tenant(tenant)
    with db.connect_dsn(source_dsn(settings), settings.database.passfile,
                        application_name=f"dn backup {tenant}") as conn, db.translate_errors(f"looking up tenant {tenant}"):
        r = conn.execute("SELECT id, created_at, status FROM tenants WHERE slug = %s", (tenant,)).fetchone()
    return TenantRow(int(r[0]), tenant, r[1], str(r[2])) if r else None


def tenant_identity(settings: "Settings", tenant: str) -> TenantRow:
    """The tenant to back up, refusing one that is deleted or being deleted (GDPR): no backup
    of it can be started."""
    from dn.errors import InvalidInput

    r = tenant_row(settings, tenant)
    if r is None:
        raise InvalidInput("tenant", f"no tenant {tenant!r} in the platform database")
    if r.status in ("deleting", "deleted"):
        raise InvalidInput("tenant", f"tenant {tenant} is {r.status} (GDPR deletion): its backups are never made again")
    return r


def run_backup(settings: "Settings", environ: Mapping[str, str], *, tenant: str | None = None,
               progress: Progress = _quiet, on_bytes: Bytes = lambda n: None, backoff: float = 1.0,
               sleep: Callable[[float], None] = time.sleep) -> Manifest:
    """Make one backup (the platform database, or one tenant's rows) in the second region.

    A tenant's backup holds the tenant's lock when run from `dn backup run` (so it cannot race a
    deletion) and is refused for a deleted tenant or one whose keys were shredded."""
    target = target_of(settings)
    row = tenant_identity(settings, tenant) if tenant is not None else None
    tenant_id, owner = (row.id, row.owner) if row else (None, keys.PLATFORM)
    ks = keys.keystore(settings, environ)

    def attempt() -> Manifest:
        with open_store(settings, retries=0) as store:
            obtain_key(store, ks, keys.PLATFORM)
            dk = obtain_key(store, ks, owner)
            if tenant is not None:  # the slug-only keys older dn made here: escrowed, never used again
                legacy = keys.legacy_owner(tenant)
                if not ks.is_destroyed(legacy) and not store.key_destroyed(legacy):
                    escrow_unescrowed(store, ks, legacy, store.get_key(legacy))
            return _backup_once(settings, store, dk, tenant, tenant_id, progress, on_bytes)

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
    # A slug-named series older dn made ends where the tenant's own series (its identity) begins:
    # its newest backup is not the newest of a live series, so it expires like any other.
    successors = {e.series.split(".")[0]: e.series for e in sorted(entries, key=lambda e: e.created)
                  if e.complete and e.series.startswith("tenant-") and "." in e.series}
    for d in list(decisions.values()):
        if d.tier == "newest" and d.series in successors:
            decisions[d.id] = dataclasses.replace(
                d, keep=False, tier="expired",
                reason=f"outside retention; its slug-named series was succeeded by {successors[d.series]}")
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
KEYSTORE_DIR = "backup-keys"  # under a data dir, here and on every host (dn.backup.keys.keystore)


def host_keystore(settings: "Settings", host: str) -> str:
    """The keystore of the dn that ``host``'s timers run (its ``dn_data_dir``), as a path on the host."""
    h = settings.host(host)
    return h.path(f"{h.dn_data_dir.rstrip('/')}/{KEYSTORE_DIR}")


def _tombstone(owner: str, ids: list[str], when: str) -> bytes:
    return json.dumps({"owner": owner, "key_ids": ids, "destroyed_at": when}).encode()


def host_key_files(session, directory: str, owner: str) -> list[str]:
    if not session.exists(directory):
        return []
    return [f"{directory}/{n}" for n in session.listdir(directory)
            if n == f"{owner}.json" or n.startswith(f".{owner}.json.")]


def _host_key_ids(session, directory: str, owner: str) -> list[str]:
    """The key ids the host's keystore lists for ``owner`` (its files and an earlier tombstone)."""
    ids: list[str] = []
    for p in host_key_files(session, directory, owner):
        ids += keys.key_ids_of(session.read_file(p))
    tomb = f"{directory}/destroyed/{owner}.json"
    if session.exists(tomb):
        try:
            ids += [str(i) for i in json.loads(session.read_file(tomb)).get("key_ids", [])]
        except (ValueError, AttributeError):
            pass  # an unreadable tombstone is rewritten with the ids known from elsewhere
    return ids


def _shred_on_host(session, directory: str, owner: str, ids: list[str], when: str) -> None:
    """Tombstone first (where the host's `dn backup run` looks), then overwrite and unlink."""
    tombdir = f"{directory}/destroyed"
    session.mkdir_p(tombdir, 0o700)
    session.install_file(f"{tombdir}/{owner}.json", _tombstone(owner, ids, when), mode=0o600, keep_previous=False)
    for p in host_key_files(session, directory, owner):
        session.run(["shred", "--iterations=1", "--remove", "--", p])


def shred(settings: "Settings", environ: Mapping[str, str], tenant: str, owner: str | None = None, *,
          store: Store | None = None) -> dict:
    """Destroy every backup key of ``tenant`` everywhere dn ever put one, and prove it.

    The owners: the tenant's own (``owner``, :attr:`TenantRow.owner`, when its row is known) and
    the slug-only owner older dn used (whichever tenant of the slug it served). The places: this
    machine's keystore, the keystore of every configured host (whose timers run `dn backup run
    --tenant` with their own data dir) and the region's escrow. Each gets a tombstone first (a
    later backup there refuses the owner, and no installation brings the key back), then its key
    files are overwritten and removed. Then every place is checked again: ``checked`` in the
    result says what was found where, and a key file left or a tombstone missing fails. After
    this, every backup of the tenant is unreadable wherever a copy of it lives (the offline disk
    holds no tenant key); `dn backup prune` then removes them. Idempotent.
    """
    from contextlib import ExitStack

    from dn import ssh

    owners = [keys.check_owner(owner)] if owner is not None else []
    owners.append(keys.legacy_owner(tenant))
    ks = keys.keystore(settings, environ)
    hosts = sorted(settings.hosts)
    with ExitStack() as stack:
        if store is None and settings.backup is not None:
            store = stack.enter_context(open_store(settings))
        sessions = {h: stack.enter_context(ssh.connect(settings.host(h))) for h in hosts}
        dirs = {h: host_keystore(settings, h) for h in hosts}
        ids: dict[str, set[str]] = {o: set(ks.key_ids(o)) for o in owners}
        escrow_had: dict[str, bool] = {}
        for o in owners:
            if store is not None:
                raw = store.get_key(o)
                escrow_had[o] = raw is not None
                ids[o] |= set(keys.key_ids_of(raw))
            for h, s in sessions.items():
                ids[o] |= set(_host_key_ids(s, dirs[h], o))
        when = datetime.now(timezone.utc).isoformat(timespec="seconds")
        destroyed: dict[str, list[str]] = {}
        for o in owners:
            # the escrow first: from then on no installation can fetch the key again
            if store is not None:
                store.destroy_key(o, _tombstone(o, sorted(ids[o]), when))
            for h, s in sessions.items():
                _shred_on_host(s, dirs[h], o, sorted(ids[o]), when)
            destroyed[o] = ks.destroy(o, also=ids[o])
        checked = [{"keystore": "operator", "where": str(ks.dir), "checked_at": _now(),
                    "owners": {o: {"key_files": ks.key_files(o), "tombstone": ks.is_destroyed(o)} for o in owners}}]
        for h, s in sessions.items():
            checked.append({"keystore": f"host {h}", "where": f"{h}:{dirs[h]}", "checked_at": _now(),
                            "owners": {o: {"key_files": host_key_files(s, dirs[h], o),
                                           "tombstone": s.exists(f"{dirs[h]}/destroyed/{o}.json")} for o in owners}})
        if store is not None:
            checked.append({"keystore": f"escrow {store.target.region}", "where": f"{store.target.region}:{store.root}/keys",
                            "checked_at": _now(),
                            "owners": {o: {"key_files": store.key_files(o), "tombstone": store.key_destroyed(o)}
                                       for o in owners}})
    failed = [f"{c['keystore']}: {o}: " + ("key files remain: " + ", ".join(r["key_files"]) if r["key_files"]
                                          else "no tombstone")
              for c in checked for o, r in c["owners"].items() if r["key_files"] or not r["tombstone"]]
    if failed:
        raise OperationFailed(f"crypto-shredding tenant {tenant}'s backup keys is not complete: {'; '.join(failed)}",
                              hint="rerun the same command")
    all_ids = sorted(set().union(*destroyed.values()))
    return {"owner": owners[0], "owners": owners, "key_ids": all_ids,
            "escrow_removed": any(escrow_had.values()), "destroyed_at": when, "checked": checked}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
