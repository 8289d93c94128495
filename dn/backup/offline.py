"""The monthly offline copy: the trust page's "a monthly offline copy" beside the second region.

``dn backup offline --to DIR`` copies the monthly copies (every series: the platform and each
tenant) of the newest month that has them from the second region into ``DIR`` (a mounted
removable disk, to be unmounted and stored away), one directory per backup:

    DIR/<backup id>/manifest.json  exactly as stored (its MAC still verifies)
    DIR/<backup id>/<artifact>     ciphertext, each checked against the manifest's SHA-256
    DIR/keys/platform.json         the platform data keys, wrapped with the passphrase (every one escrowed)

the region's own layout, so the disk can serve as a backup target for a restore when the region
is lost. Nothing is decrypted: the copy is as safe as the region's. A tenant's data key never goes
to the disk: it stays here and in the region's escrow only, where ``dn backup shred`` (GDPR
deletion) can reach it, so shredding it makes the tenant's copies on a disk in a drawer
unreadable too. Restoring a tenant copy from the disk therefore needs this machine's keystore or
the region's escrow. A copy is written under
``.<id>.partial`` and renamed when every artifact checked out, so a backup directory on the disk is
complete. Each copied backup gets a record in the region (``offline.json``: when, where, SHA-256
of the manifest) that ``dn verify``'s backup.monthly check reads. A backup whose key was
crypto-shredded is never copied (the GDPR deletion made it unreadable on purpose).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

from dn.backup import keys
from dn.backup.manifest import MANIFEST_NAME
from dn.backup.store import KEYS_DIR
from dn.errors import InvalidInput, OperationFailed
from dn.localfile import write_atomic

if TYPE_CHECKING:
    from dn.backup.run import Row
    from dn.backup.store import Store
    from dn.config import Settings

CHUNK = 1 << 20
Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


def check_args(to: Path, backup_id: str | None) -> None:
    """Refuse bad input before anything is read or written (InvalidInput naming the option)."""
    from dn.backup.manifest import ID_RE

    if not Path(to).is_dir():
        raise InvalidInput("--to", f"{to} is not a directory (mount the offline disk first)")
    if backup_id is not None and not ID_RE.fullmatch(backup_id):
        raise InvalidInput("--backup", f"{backup_id!r} is not a backup id (see `dn backup list`)")


def choose(rows: list["Row"], backup_id: str | None = None) -> list["Row"]:
    """The backups to copy: ``backup_id``, or every kept monthly copy of the newest month that
    has one (one per series)."""
    if backup_id is not None:
        picked = [r for r in rows if r.listing.id == backup_id]
        if not picked:
            raise InvalidInput("--backup", f"no backup {backup_id} in the second region; see `dn backup list`")
        row = picked[0]
        if not row.listing.complete:
            raise InvalidInput("--backup", f"backup {backup_id} is incomplete (its upload never finished)")
        if row.decision.tier == "shredded":
            raise InvalidInput("--backup", f"backup {backup_id}'s key was crypto-shredded: it is not copied")
        return picked
    monthly = [r for r in rows if r.decision.keep and r.decision.tier == "monthly" and r.listing.complete]
    if not monthly:
        raise OperationFailed("no monthly copy in the second region yet", hint="run `dn backup run` first")
    newest = max((r.listing.created.year, r.listing.created.month) for r in monthly)
    return sorted((r for r in monthly if (r.listing.created.year, r.listing.created.month) == newest),
                  key=lambda r: r.listing.id)


def _copy_artifact(store: "Store", backup_id: str, name: str, size: int, sha256: str, dest: Path) -> None:
    reader = store.open_artifact(backup_id, name)
    digest, written = hashlib.sha256(), 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while True:
            block = reader.read(CHUNK)
            if not block:
                break
            digest.update(block)
            view = memoryview(block)
            while view:
                view = view[os.write(fd, view):]
            written += len(block)
        os.fsync(fd)
    finally:
        os.close(fd)
        reader.close()
    if written != size or digest.hexdigest() != sha256:
        raise OperationFailed(f"backup {backup_id}: artifact {name} read back as {written} bytes with SHA-256 "
                              f"{digest.hexdigest()[:16]}..., the manifest says {size} bytes, {sha256[:16]}...",
                              hint="nothing was kept; run the copy again, and `dn dr drill --backup` on it")


def copy_one(store: "Store", row: "Row", to: Path, *, now: datetime, progress: Progress = _quiet) -> dict:
    """Copy one backup into ``to/<id>``; returns what was copied."""
    lst = row.listing
    m = lst.manifest
    final, partial = to / lst.id, to / f".{lst.id}.partial"
    raw_manifest = store.manifest_bytes(lst.id)
    manifest_sha = hashlib.sha256(raw_manifest).hexdigest()
    out = {"backup": lst.id, "series": row.decision.series, "month": f"{lst.created:%Y-%m}", "path": str(final),
           "bytes": sum(a.size for a in m.artifacts), "manifest_sha256": manifest_sha}
    if final.exists():
        kept = final / MANIFEST_NAME
        if kept.exists() and hashlib.sha256(kept.read_bytes()).hexdigest() == manifest_sha:
            progress(f"{lst.id}: already in {to}")
            if (lst.offline or {}).get("manifest_sha256") != manifest_sha:  # copied, then cut short
                _record(store, lst.id, final, manifest_sha, now)
            return {**out, "result": "already there"}
        raise OperationFailed(f"{final} exists and is not this backup's copy", hint="move it away, then rerun")
    key = store.get_key(m.key.owner) if m.key.owner == keys.PLATFORM else None
    if m.key.owner == keys.PLATFORM and key is None:
        raise OperationFailed(f"backup {lst.id}: its data key {m.key.owner} is not escrowed in the second region",
                              hint="see runbooks/disaster-recovery.md")
    shutil.rmtree(partial, ignore_errors=True)  # a copy cut short before
    partial.mkdir(mode=0o700)
    try:
        for a in m.artifacts:
            progress(f"{lst.id}: {a.name} ({a.size} bytes)")
            _copy_artifact(store, lst.id, a.name, a.size, a.sha256, partial / a.name)
        if key is not None:
            (to / KEYS_DIR).mkdir(mode=0o700, exist_ok=True)
            write_atomic(to / KEYS_DIR / f"{m.key.owner}.json", key)  # the newest wrapping of that key
        write_atomic(partial / MANIFEST_NAME, raw_manifest)
        os.rename(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _record(store, lst.id, final, manifest_sha, now)
    return {**out, "result": "copied"}


def _record(store: "Store", backup_id: str, final: Path, manifest_sha: str, now: datetime) -> None:
    store.record_offline(backup_id, {"at": now.isoformat(timespec="seconds"), "to": str(final),
                                     "manifest_sha256": manifest_sha})


def copy_offline(settings: "Settings", environ: Mapping[str, str], to: Path, *, backup_id: str | None = None,
                 now: datetime | None = None, progress: Progress = _quiet) -> list[dict]:
    """Copy the newest month's monthly copies (or ``backup_id``) into the directory ``to``."""
    from dn.backup import run

    to = Path(to)
    check_args(to, backup_id)
    now = now or datetime.now(timezone.utc)
    with run.open_store(settings, progress=progress) as store:
        rows = choose(run.plan(settings, environ, store, now), backup_id)
        return [copy_one(store, row, to, now=now, progress=progress) for row in rows]
