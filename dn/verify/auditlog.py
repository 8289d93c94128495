"""Audit log claims: the hash chain verifies, and retention is 90 days — nothing older remains
(pruned behind a signed anchor), nothing younger was pruned.
"""
from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from dn.verify.core import Status, plural

if TYPE_CHECKING:
    from dn.verify.probe import Probe

TRUST_DAYS = 90  # "An append-only audit log of all privileged actions (90-day retention)"
GRACE_DAYS = 1  # the prune runs daily: an entry may outlive the retention by up to a day


def check_chain(probe: "Probe") -> tuple[Status, list[str]]:
    r = probe.audit_verify()
    ev = [f"{plural(r.checked, 'entry', 'entries')} checked"
          + (f" (#{r.first_seq}..#{r.last_seq})" if r.first_seq is not None else "")
          + f"; chain head #{r.head_seq}; {plural(r.anchors, 'anchor')}"
          + (f", latest over #..{r.anchor.anchor_seq}" if r.anchor else "")]
    ev.append(f"witness of this machine: #{r.witness.seq} seen {r.witness.seen_at}" if r.witness
              else "no witness on this machine yet (first verification here)")
    if r.ok:
        return Status.PASS, ev
    return Status.FAIL, [f"{p.kind}: {p}" for p in r.problems] + ev


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
        "SELECT anchor_seq, anchor_at, signed_at, pruned_from, pruned_count FROM audit_anchor ORDER BY anchor_seq",
        what="reading the audit anchors")
    ev.append(f"{plural(row['n'], 'entry', 'entries')}, oldest {row['oldest']:%Y-%m-%d} (#{row['first']})" if row["n"]
              else "no entries")
    if row["overdue"]:
        fails.append(f"{plural(row['overdue'], 'entry', 'entries')} older than {days} days still in the log "
                     f"(oldest {row['overdue_oldest']:%Y-%m-%d}): the retention prune is overdue")
    for a in anchors:
        kept = (a["signed_at"] - a["anchor_at"]).days
        line = (f"anchor #{a['anchor_seq']}: pruned #{a['pruned_from']}..#{a['anchor_seq']} ({a['pruned_count']} entries) "
                f"on {a['signed_at']:%Y-%m-%d}, newest pruned entry {kept} days old")
        if a["signed_at"] - a["anchor_at"] < timedelta(days=TRUST_DAYS):
            fails.append(f"{line}: younger than {TRUST_DAYS} days")
        else:
            ev.append(line)
    if anchors and row["first"] is not None and row["first"] != anchors[-1]["anchor_seq"] + 1:
        fails.append(f"the chain starts at #{row['first']}, not right after the last anchor "
                     f"(#{anchors[-1]['anchor_seq']}): entries were removed without an anchor")
    if not anchors and row["first"] not in (None, 1):
        fails.append(f"the chain starts at #{row['first']} and no anchor covers #1..#{row['first'] - 1}")
    return (Status.FAIL if fails else Status.PASS), fails + ev

