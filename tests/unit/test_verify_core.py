"""dn verify's runner, exit codes, evidence history and renderers (pure apart from a temp dir)."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from dn.errors import InvalidInput, Unreachable
from dn.verify import core
from dn.verify.claims import CLAIMS, ids
from dn.verify.core import Claim, Status, Unknown


def _claim(cid, fn):
    return Claim(cid, f"claim {cid}", f"method {cid}", fn)


def _unknown(_):
    raise Unknown("could not look", ["saw this first"])


def _unreachable(_):
    raise Unreachable("cannot reach eu1: connection refused")


def _crash(_):
    raise KeyError("boom")


CASES = [
    _claim("a.pass", lambda p: (Status.PASS, ["fine"])),
    _claim("b.fail", lambda p: (Status.FAIL, ["broken because x"])),
    _claim("c.unknown", _unknown),
    _claim("d.unreachable", _unreachable),
    _claim("e.crash", _crash),
]


def test_every_outcome_is_a_result_and_the_run_goes_on():
    seen = []
    results = core.run_checks(CASES, probe=None, on_result=lambda r: seen.append(r.id))
    assert [r.id for r in results] == seen == [c.id for c in CASES]
    by = {r.id: r for r in results}
    assert by["a.pass"].status is Status.PASS and by["a.pass"].evidence == ["fine"]
    assert by["b.fail"].status is Status.FAIL
    assert by["c.unknown"].status is Status.UNKNOWN and by["c.unknown"].reason == "could not look"
    assert by["c.unknown"].evidence == ["saw this first"]
    assert by["d.unreachable"].status is Status.UNKNOWN and "connection refused" in by["d.unreachable"].reason
    assert by["e.crash"].status is Status.UNKNOWN
    assert by["e.crash"].reason.startswith("unexpected error in the check: KeyError")
    assert all(r.seconds >= 0 for r in results)


def test_selection_keeps_order_and_refuses_unknown_ids():
    assert [c.id for c in core.select(CASES, ["e.crash", "a.pass"])] == ["a.pass", "e.crash"]
    assert [c.id for c in core.select(CASES, "b.fail")] == ["b.fail"]
    assert core.select(CASES, []) == CASES
    with pytest.raises(InvalidInput) as ei:
        core.select(CASES, ["a.pass", "nope"])
    assert ei.value.field == "--check" and "no check 'nope'" in ei.value.rule and "a.pass" in ei.value.rule


@pytest.mark.parametrize("statuses, code", [
    ([Status.PASS, Status.PASS], 0),
    ([Status.PASS, Status.UNKNOWN], 1),
    ([Status.UNKNOWN, Status.FAIL], 4),
    ([], 0),
])
def test_exit_codes(statuses, code):
    assert core.exit_code([core.Result(str(i), "c", "m", s) for i, s in enumerate(statuses)]) == code


def test_evidence_is_trimmed():
    r = core.run_checks([_claim("x.long", lambda p: (Status.PASS, [f"line {i}" * 100 for i in range(100)]))], None)[0]
    assert len(r.evidence) == core.EVIDENCE_LIMIT + 1 and r.evidence[-1] == "... 60 more lines"
    assert all(len(line) <= 300 for line in r.evidence)


def test_history_records_each_run_and_when_each_claim_last_passed(tmp_path):
    t0 = datetime(2026, 11, 1, 5, 0, tzinfo=timezone.utc)
    first = [core.Result("a", "A", "m", Status.PASS), core.Result("b", "B", "m", Status.FAIL, ["x"])]
    second = [core.Result("a", "A", "m", Status.FAIL, ["y"]), core.Result("b", "B", "m", Status.PASS)]
    p1 = core.record(tmp_path, "eu1", first, t0)
    p2 = core.record(tmp_path, "eu1", second, t0 + timedelta(days=1))
    assert p1.parent == tmp_path / "evidence" and (p1.parent.stat().st_mode & 0o777) == 0o700
    assert json.loads(p2.read_text())["host"] == "eu1"
    runs = core.history(tmp_path)
    assert len(runs) == 2
    last = core.last_passed(runs)
    assert last["a"]["last_status"] == "FAIL" and last["a"]["last_pass"] == t0.isoformat()
    assert last["b"]["last_status"] == "PASS" and last["b"]["last_pass"] == (t0 + timedelta(days=1)).isoformat()
    (tmp_path / "evidence" / "garbage.json").write_text("{not json")
    assert len(core.history(tmp_path)) == 2


def test_renderers():
    rs = [core.Result("a.x", "A claim", "how", Status.PASS, ["fact"]),
          core.Result("b.y", "B claim", "how", Status.UNKNOWN, [], reason="host down")]
    doc = core.to_json(rs, "eu1")
    assert doc["ok"] is False and doc["counts"] == {"PASS": 1, "FAIL": 0, "UNKNOWN": 1}
    md = core.to_markdown(rs, "eu1", datetime(2026, 11, 1, tzinfo=timezone.utc))
    assert md.startswith("# dn verify — eu1, 2026-11-01 00:00 UTC")
    assert "| `a.x` | A claim | PASS |" in md and "*Reason:* host down" in md and "```\nfact\n```" in md


def test_claims_have_stable_unique_ids_and_say_how():
    assert ids() == ["net.public-ports", "net.admin-ssh", "access.ci-preview-read-only", "ssh.host-key", "net.tenant-isolation", "net.tenant-default-closed",
                     "nginx.rate-limits", "nginx.tls",
                     "nginx.hsts", "nginx.no-drift", "storage.luks", "backup.fresh", "backup.retention",
                     "backup.monthly", "dr.drill", "audit.chain", "audit.witness", "audit.retention", "retention.events",
                     "retention.aggregates", "gdpr.deadlines", "gdpr.state-purged", "gdpr.keys-shredded", "keys.no-retired"]
    assert all(c.claim and c.method and callable(c.fn) for c in CLAIMS)
