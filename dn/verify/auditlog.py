"""Audit log claims: the hash chain verifies (against the pinned anchor keys and the witness kept
in the second region), the region's witness is recent, and retention is 90 days — nothing older
remains (pruned behind a signed anchor), nothing younger was pruned.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from dn.verify.core import Status, plural

if TYPE_CHECKING:
    from dn.verify.probe import Probe

TRUST_DAYS = 90  # "An append-only audit log of all privileged actions (90-day retention)"
GRACE_DAYS = 1  # the prune runs daily: an entry may outlive the retention by up to a day
# The daily verify adds a witness; older than this, the unwitnessed tail (entries anyone holding
# the database could remove unseen) is more than a day's worth.
WITNESS_MAX_AGE = timedelta(hours=36)


def check_chain(probe: "Probe") -> tuple[Status, list[str]]:
    r = probe.audit_verify()
    ev = [f"{plural(r.checked, 'entry', 'entries')} checked"
          + (f" (#{r.first_seq}..#{r.last_seq})" if r.first_seq is not None else "")
          + f"; chain head #{r.head_seq}; {plural(r.anchors, 'anchor')}"
          + (f", latest over #..{r.anchor.anchor_seq}" if r.anchor else "")
          + f"; {plural(r.trusted_keys, 'pinned key')}"]
    ev.append(f"second region's witness: #{r.region_witness.seq} of {r.region_witness.witnessed_at}"
              if r.region_witness else "no witness in the second region yet")
    if r.recorded:
        ev.append(f"added witness #{r.recorded.seq} to the second region")
    ev.append(f"witness of this machine: #{r.witness.seq} seen {r.witness.seen_at}" if r.witness
              else "no witness on this machine yet (first verification here)")
    if r.ok:
        return Status.PASS, ev
    return Status.FAIL, [f"{p.kind}: {p}" for p in r.problems] + ev


def check_witness(probe: "Probe", now: datetime | None = None) -> tuple[Status, list[str]]:
    """The newest witness in the second region (signed by a pinned key; the chain check compares
    the chain with it) covers the whole chain or is at most WITNESS_MAX_AGE old."""
    r = probe.audit_verify()
    unverified = [str(p) for p in r.problems if p.kind == "unverified"]
    if unverified:
        return Status.FAIL, unverified
    w = r.recorded or r.region_witness
    if w is None:
        if r.last_seq <= 0:
            return Status.PASS, ["the audit log is empty: nothing to witness yet"]
        return Status.FAIL, [f"no witness in the second region for a chain of #{r.last_seq}: entries can be removed "
                             "from the end unseen; pin the anchor key of the machine that runs `dn verify` daily"]
    age = (now or datetime.now(timezone.utc)) - datetime.fromisoformat(w.witnessed_at)
    line = (f"newest witness #{w.seq} of {w.witnessed_at} ({age.total_seconds() / 3600:.1f} h old), chain at "
            f"#{r.last_seq}")
    if w.seq < r.last_seq and age > WITNESS_MAX_AGE:
        return Status.FAIL, [f"{line}: older than {WITNESS_MAX_AGE.total_seconds() / 3600:.0f} h, so the entries "
                             "after it have no witness the database cannot rewrite"]
    return Status.PASS, [line]


def check_retention(probe: "Probe") -> tuple[Status, list[str]]:
    days = probe.settings.retention.audit_days
    fails, ev = [], []
    if days < TRUST_DAYS:
        fails.append(f"retention.audit_days = {days}: entries would be pruned before {TRUST_DAYS} days")
    row = probe.query(
        "SELECT count(*) AS n, min(at) AS oldest, min(seq) AS first,"
        " count(*) FILTER (WHERE at < now() - make_interval(days => %s)) AS overdue,"
        " min(at) FILTER (WHERE at < now() - make_interval(days => %s)) AS overdue_oldest"
        " FROM audit_log", (days + GRACE_DAYS, days + GRACE_DAYS), what="reading the audit log")[0]
    anchors = probe.query(
        "SELECT anchor_seq, anchor_at, created_at, pruned_from, pruned_count FROM audit_anchor ORDER BY anchor_seq",
        what="reading the audit anchors")
    ev.append(f"{plural(row['n'], 'entry', 'entries')}, oldest {row['oldest']:%Y-%m-%d} (#{row['first']})" if row["n"]
              else "no entries")
    if row["overdue"]:
        fails.append(f"{plural(row['overdue'], 'entry', 'entries')} older than {days} days still in the log "
                     f"(oldest {row['overdue_oldest']:%Y-%m-%d}): the retention prune is overdue")
    for a in anchors:
        # created_at is the database's clock at the prune (no caller ever set it); signed_at was
        # the caller's word before migration 005.
        kept = (a["created_at"] - a["anchor_at"]).days
        line = (f"anchor #{a['anchor_seq']}: pruned #{a['pruned_from']}..#{a['anchor_seq']} ({a['pruned_count']} entries) "
                f"on {a['created_at']:%Y-%m-%d}, newest pruned entry {kept} days old")
        if a["created_at"] - a["anchor_at"] < timedelta(days=TRUST_DAYS):
            fails.append(f"{line}: younger than {TRUST_DAYS} days")
        else:
            ev.append(line)
    if anchors and row["first"] is not None and row["first"] != anchors[-1]["anchor_seq"] + 1:
        fails.append(f"the chain starts at #{row['first']}, not right after the last anchor "
                     f"(#{anchors[-1]['anchor_seq']}): entries were removed without an anchor")
    if not anchors and row["first"] not in (None, 1):
        fails.append(f"the chain starts at #{row['first']} and no anchor covers #1..#{row['first'] - 1}")
    return (Status.FAIL if fails else Status.PASS), fails + ev

