"""The deletion plan of a GDPR request (pure): what will be destroyed, crypto-erased,
crypto-shredded, deleted and retained (and why), and by when.

`dn gdpr delete --dry-run` prints exactly this; execution (dn.gdpr.workflow) follows the steps
in :data:`STEPS` order and records the plan in its journal.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Iterable, Mapping

from dn.errors import ConfigError
from dn.gdpr.datamap import TENANTS, DataMap

# The steps of a deletion, in order. "disable" comes first so no new data arrives; the host's
# volume is crypto-erased before the stack is destroyed (the erase leaves the luksDump evidence;
# destroying the stack removes the then-unreadable file); backup keys are shredded before rows
# are deleted, so a crash in between never leaves readable backups of a half-deleted tenant.
STEPS = ("disable", "luks", "stack", "backup-keys", "rows", "minimise", "certificate")

STEP_TITLES = {
    "disable": "disable the tenant (status deleting: new writes refused)",
    "luks": "crypto-erase the LUKS volume (all keyslots, header backups)",
    "stack": "destroy the stack (containers, network, nginx vhost, firewall chains, timers)",
    "backup-keys": "crypto-shred the tenant's backup keys (every backup of the tenant unreadable)",
    "rows": "delete the tenant's rows per the data map, in batches",
    "minimise": "minimise the retained rows",
    "certificate": "write the deletion certificate; tenant status deleted, request done",
}


@dataclass(frozen=True)
class Tenant:
    id: int
    slug: str
    status: str
    host: str


@dataclass(frozen=True)
class Request:
    id: int
    tenant_id: int
    received_at: datetime
    due_at: datetime
    status: str
    completed_at: datetime | None = None


@dataclass(frozen=True)
class HostNames:
    """The tenant's resources on its EU host, by their derived names (dn.models)."""

    host: str
    network: str
    containers: tuple[str, ...]
    vhost: str
    chains: tuple[str, ...]
    timers: tuple[str, ...]
    volume: str
    mapper: str
    mount: str


@dataclass(frozen=True)
class BackupKeys:
    owner: str
    key_ids: tuple[str, ...]
    destroyed: bool
    keystore: str
    region: str | None


@dataclass
class DeletionPlan:
    request_id: int
    tenant: Tenant
    received_at: datetime
    due_at: datetime
    now: datetime
    destroy: list[dict[str, str]]
    crypto_erase: dict[str, Any]
    crypto_shred: dict[str, Any]
    delete: list[dict[str, Any]]
    retain: list[dict[str, Any]]
    steps: tuple[str, ...] = STEPS
    notes: list[str] = field(default_factory=list)

    @property
    def days_left(self) -> int:
        return days_left(self.due_at, self.now)

    def counts(self) -> dict[str, int]:
        return {d["table"]: d["rows"] for d in self.delete + self.retain}

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "tenant": asdict(self.tenant),
            "received_at": self.received_at.isoformat(),
            "deadline": self.due_at.isoformat(),
            "days_left": self.days_left,
            "destroy": self.destroy,
            "crypto_erase": self.crypto_erase,
            "crypto_shred": self.crypto_shred,
            "delete": self.delete,
            "retain": self.retain,
            "steps": [{"step": s, "does": STEP_TITLES[s]} for s in self.steps],
            "notes": self.notes,
        }


def days_left(due_at: datetime, now: datetime) -> int:
    """Whole days until the deadline (negative when it has passed)."""
    return math.floor((due_at - now).total_seconds() / 86400)


def deletion_order(dm: DataMap, foreign_keys: Iterable[tuple[str, str]]) -> list[str]:
    """The tables deleted with the tenant, children before parents (foreign keys and joins).

    A table that is kept but references a deleted table would make the delete fail (or cascade
    silently): that is a data map error.
    """
    doomed = {n for n, t in dm.tables.items() if t.on_delete == "delete"}
    edges: set[tuple[str, str]] = set()
    for child, parent in foreign_keys:
        if parent in doomed and child != parent:
            if child not in doomed:
                raise ConfigError(f"{dm.path}: {child} is kept but references {parent}, which a deletion "
                                  f"removes; classify {child} as deleted too, or keep {parent}")
            edges.add((child, parent))
    for n in doomed:
        link = dm.tables[n].tenant
        if link.kind == "join" and link.via in doomed:
            edges.add((n, link.via))
    order: list[str] = []
    remaining = set(doomed)
    while remaining:
        # a table goes when no remaining table still references it
        ready = sorted(t for t in remaining if not any(c in remaining and p == t for c, p in edges))
        if not ready:
            raise ConfigError(f"{dm.path}: the tables {', '.join(sorted(remaining))} reference each other in a cycle")
        order += ready
        remaining -= set(ready)
    return order


def build(dm: DataMap, *, tenant: Tenant, request: Request, counts: Mapping[str, int],
          foreign_keys: Iterable[tuple[str, str]], host: HostNames, keys: BackupKeys, now: datetime,
          retention: Any = None) -> DeletionPlan:
    """The plan for deleting ``tenant`` under ``request``; ``counts`` holds the tenant's rows per
    tenant-bound table."""
    order = deletion_order(dm, foreign_keys)
    delete = [{"table": n, "class": dm.tables[n].data_class, "rows": int(counts.get(n, 0))} for n in order]
    retain = []
    for t in sorted(dm.tenant_bound(), key=lambda t: (t.name != TENANTS, t.name)):
        if t.on_delete not in ("retain", "minimise"):
            continue
        retain.append({"table": t.name, "class": t.data_class, "rows": int(counts.get(t.name, 0)),
                       "action": t.on_delete, "minimise": dict(t.minimise), "reason": t.reason,
                       "kept_for": dm.classes[t.data_class].period.describe(retention)})
    destroy = [{"kind": "docker container", "name": c} for c in host.containers]
    destroy += [{"kind": "docker network", "name": host.network},
                {"kind": "nginx vhost", "name": host.vhost}]
    destroy += [{"kind": "firewall chain", "name": c} for c in host.chains]
    destroy += [{"kind": "systemd unit", "name": u} for u in host.timers]
    erase = {"volume": host.volume, "mapper": host.mapper, "host": host.host,
             "does": "cryptsetup erase: every keyslot of the LUKS header destroyed, any header backup "
                     "of the volume destroyed; the data becomes unreadable"}
    shred = {"owner": keys.owner, "key_ids": list(keys.key_ids), "already_destroyed": keys.destroyed,
             "keystore": keys.keystore, "escrow_region": keys.region,
             "does": "the tenant's backup data keys are destroyed here and in the backup region's escrow: "
                     "every backup of the tenant, wherever a copy lives, becomes unreadable"}
    notes = []
    if request.status == "done":
        notes.append("this request is already done")
    if days_left(request.due_at, now) < 0:
        notes.append(f"the deadline passed {-days_left(request.due_at, now)} day(s) ago: complete it now "
                     "and record why it was late")
    return DeletionPlan(request.id, tenant, request.received_at, request.due_at, now, destroy, erase, shred,
                        delete, retain, notes=notes)


def render_text(plan: DeletionPlan) -> str:
    """The plan as a person reads it before confirming."""
    t = plan.tenant
    left = plan.days_left
    when = f"{left} day(s) left" if left >= 0 else f"OVERDUE by {-left} day(s)"
    lines = [
        f"GDPR deletion of tenant {t.slug} (id {t.id}, host {t.host}, status {t.status}), request {plan.request_id}",
        f"received {plan.received_at:%Y-%m-%d %H:%M} UTC, deadline {plan.due_at:%Y-%m-%d %H:%M} UTC ({when})",
        "",
        "destroy (the tenant's stack on its host):",
    ]
    lines += [f"  - {d['kind']}: {d['name']}" for d in plan.destroy]
    lines += ["crypto-erase:", f"  - LUKS volume {plan.crypto_erase['volume']} on {plan.crypto_erase['host']}: "
              "all keyslots, and any header backup"]
    s = plan.crypto_shred
    ids = ", ".join(s["key_ids"]) or "none in the local keystore"
    lines += ["crypto-shred:", f"  - backup keys of {s['owner']} ({ids})"
              + (" — already destroyed" if s["already_destroyed"] else "")
              + (f"; escrow copy in region {s['escrow_region']}" if s["escrow_region"] else "; no backup region configured")]
    lines += ["delete (rows, in this order, in batches):"]
    lines += [f"  - {d['table']:<20} {d['rows']:>10} rows  ({d['class']})" for d in plan.delete]
    lines += ["retain:"]
    for r in plan.retain:
        what = "kept, minimised: " + ", ".join(f"{c} -> {how}" for c, how in r["minimise"].items()) \
            if r["action"] == "minimise" else "kept"
        lines.append(f"  - {r['table']:<20} {r['rows']:>10} rows  {what}; for {r['kept_for']}")
        lines.append(f"      why: {r['reason']}")
    lines += ["steps: " + " -> ".join(plan.steps)]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
