"""gdpr.keys-shredded: a deleted tenant's backup keys exist nowhere dn ever put one.

For every tenant the registry records as deleted (GDPR), and every owner any keystore holds a
tombstone for (a destroyed tenant's row may be gone), three places are read: this machine's
keystore, the keystore of the verified host (over SSH: its timers run `dn backup run --tenant`
with their own data dir, dn.backup.run.host_keystore) and the second region's escrow. A key
file of such an owner in any of them fails; so does a deleted tenant without a tombstone in one
of them (a later backup there would not know the tenant is gone). Evidence names owners and
paths, never a key.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from dn.verify.core import Status, plural

if TYPE_CHECKING:
    from dn.verify.probe import Probe


def _places(probe: "Probe") -> list[tuple[str, Callable[[str], list[str]], Callable[[str], bool], Callable[[], set[str]]]]:
    """(name, key files of an owner, has a tombstone, owners with a tombstone) of each keystore."""
    from dn.backup import keys, run

    ks = keys.keystore(probe.settings, probe.environ)
    places = [(f"this machine's keystore {ks.dir}", ks.key_files, ks.is_destroyed,
               lambda: set(ks.destroyed_key_ids().values()) | _local_tombs(ks))]
    s = probe.session()
    d = run.host_keystore(probe.settings, probe.host_name)

    def host_tombs() -> set[str]:
        td = f"{d}/destroyed"
        return {n[:-5] for n in s.listdir(td) if n.endswith(".json")} if s.exists(td) else set()

    places.append((f"host {probe.host_name}'s keystore {d}", lambda o: run.host_key_files(s, d, o),
                   lambda o: s.exists(f"{d}/destroyed/{o}.json"), host_tombs))
    if probe.settings.backup is not None:
        store = probe.backup_store()
        places.append((f"the escrow in {store.where}", store.key_files, store.key_destroyed,
                       lambda: set(store.destroyed_key_ids().values())))
    return places


def _local_tombs(ks) -> set[str]:
    d = ks.dir / "destroyed"
    return {p.stem for p in d.glob("*.json")} if d.is_dir() else set()


def check_keys_shredded(probe: "Probe") -> tuple[Status, list[str]]:
    from dn.backup import keys

    rows = probe.query("SELECT id, slug, created_at FROM tenants WHERE status = 'deleted' ORDER BY id",
                       what="reading deleted tenants")
    deleted = {keys.owner_for(r["slug"], int(r["id"]), r["created_at"]): r["slug"] for r in rows}
    deleted.update({keys.legacy_owner(slug): slug for slug in list(deleted.values())})
    fails, ev = [], [f"{plural(len(rows), 'deleted tenant')} in the registry"]
    if probe.settings.backup is None:
        ev.append("no backup region configured: no escrow to read")
    for name, files_of, tombstoned, tombs in _places(probe):
        owners = set(deleted) | {o for o in tombs() if o != keys.PLATFORM}
        left = {o: files_of(o) for o in sorted(owners)}
        for o, files in left.items():
            if files:
                fails.append(f"{name}: key file(s) of shredded owner {o} remain: {', '.join(files)}")
        # legacy slug owners get a tombstone only where they ever were
        missing = sorted(o for o in deleted if "." in o and not tombstoned(o))
        for o in missing:
            fails.append(f"{name}: no tombstone for deleted tenant {deleted[o]} ({o}): a backup there would not "
                         "know it is gone")
        ev.append(f"{name}: {plural(len(owners), 'shredded owner')} checked, "
                  f"{sum(1 for f in left.values() if f)} with key files, {len(missing)} without a tombstone")
    return (Status.FAIL if fails else Status.PASS), fails + ev
