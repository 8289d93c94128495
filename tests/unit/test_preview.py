"""The preview renderer on engine event streams recorded from the real engine running dn's stacks
against the sandbox host (tests/data/events/record.py): creates, updates, replacements, deletes,
a policy violation, a failed preview, drift, and a diff too big for one pull-request comment."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dn import preview as pv
from dn.errors import ExitCode

EVENTS = Path(__file__).resolve().parents[1] / "data" / "events"
RECORDED_SECRET = "cmVjb3JkZWQtY29udGFpbmVyLWNvbmZpZy1zZWNyZXQ="  # what the recorder set as CONTAINER_CONFIG


def events(name: str) -> list[dict]:
    return json.loads((EVENTS / f"{name}.json").read_text())


def preview(*names: str) -> pv.Preview:
    return pv.preview_from_events({n: events(n) for n in names})


def changed(p: pv.Preview) -> list[tuple[str, str, str]]:
    return [(s.op, s.kind, s.name) for s in p.steps()]


def all_outputs(p: pv.Preview) -> str:
    return pv.render_text(p) + pv.render_markdown(p) + pv.to_json(p)


# --------------------------------------------------------------------------- creates


def test_tenant_create():
    p = preview("tenant-create")
    assert pv.totals(p) == {"create": 7, "update": 0, "replace": 0, "delete": 0, "same": 0}
    assert sorted(changed(p)) == sorted([
        ("create", "network", "rec-acme-network"), ("create", "container", "rec-acme-tagging"),
        ("create", "container", "rec-acme-preview"), ("create", "firewall", "rec-acme-firewall"),
        ("create", "nginx", "rec-acme-nginx-vhost"), ("create", "volume", "rec-acme-luks-volume"),
        ("create", "timer", "rec-acme-backup-timer")])
    assert p.changed and pv.exit_code(p) == ExitCode.OK and p.stateful() == []
    assert {(s.name, tuple(s.flags)) for s in p.compliance()} == {
        ("rec-acme-network", ("network change",)), ("rec-acme-firewall", ("firewall change",))}
    net = next(s for s in p.steps() if s.kind == "network")
    assert net.detail_source == "inputs"
    assert {c.path: c.new for c in net.changes}["subnet"] == "10.210.230.0/28"
    vol = next(s for s in p.steps() if s.kind == "volume")
    assert {c.path: c.new for c in vol.changes}["key"] == "[secret]"
    text = pv.render_text(p)
    assert text.startswith("changes: 7 to create, 0 to update, 0 to replace, 0 to delete (1 stack)\n")
    assert "+ subnet: \"10.210.230.0/28\"" in text and "host, ssh and schedule inputs not shown" in text


def test_host_create_flags_the_firewall_only():
    p = preview("host-create")
    assert pv.totals(p)["create"] == 8
    kinds = sorted(s.kind for s in p.steps())
    assert kinds == ["directory", "firewall", "nginx"] + ["timer"] * 5
    assert [(s.name, s.flags) for s in p.compliance()] == [("sandbox-eu1-firewall-baseline", ["firewall change"])]


# --------------------------------------------------------------------------- updates


def test_rate_limit_update_is_exactly_that():
    p = preview("tenant-update-rate-limits")
    assert pv.totals(p) == {"create": 0, "update": 1, "replace": 0, "delete": 0, "same": 6}
    (step,) = p.steps()
    assert (step.op, step.kind, step.name, step.flags) == ("update", "nginx", "rec-acme-nginx-vhost",
                                                           ["rate limit change"])
    assert [(c.path, c.how, c.old, c.new) for c in step.changes] == [
        ("tenant.limits.burst_per_ip", "update", 20, 50),
        ("tenant.limits.burst_per_tenant", "update", 400, 1200),
        ("tenant.limits.rate_per_ip", "update", 10, 25),
        ("tenant.limits.rate_per_tenant", "update", 200, 600),
        ("tenant.plan", "update", "standard", "busy")]
    md = pv.render_markdown(p)
    assert "- `tenant-update-rate-limits` update nginx `rec-acme-nginx-vhost`: **rate limit change**" in md
    assert "~ tenant.limits.rate_per_ip: 10 => 25" in md


def test_admin_source_update():
    p = preview("host-update-admin-source")
    (step,) = p.steps()
    assert step.flags == ["firewall change", "host access change"]
    assert [c.to_dict() for c in step.changes] == [
        {"path": "host.admin_sources[1]", "how": "add", "old": None, "new": "192.0.2.0/24", "replaces": False}]


# --------------------------------------------------------------------------- replacements and deletes


def test_replacements_of_stateful_resources_come_first():
    p = preview("tenant-move-prefix")
    assert pv.totals(p)["replace"] == 3 and pv.totals(p)["delete"] == 0
    assert [(s.op, s.kind, s.name) for s in p.stateful()] == [("replace", "volume", "rec-acme-luks-volume")]
    vol = p.stateful()[0]
    assert vol.replace_keys == ["image"] and "volume replacement" in vol.flags
    assert [(c.path, c.old, c.new) for c in vol.changes] == [
        ("host.prefix", "/srv/dn-sandbox/eu1", "/srv/dn-sandbox/eu1-moved")]
    md = pv.render_markdown(p)
    stateful = md.index("### ⚠️ Stateful resources deleted or replaced")
    assert stateful < md.index("### 🔎 Compliance-relevant changes") < md.index("<details>")
    assert "- **replace** volume `rec-acme-luks-volume` in `tenant-move-prefix` (because: `image`)" in md


def test_deletes():
    p = preview("tenant-destroy")
    assert pv.totals(p) == {"create": 0, "update": 0, "replace": 0, "delete": 7, "same": 0}
    assert sorted((s.kind, s.name) for s in p.stateful()) == [("network", "rec-acme-network"),
                                                              ("volume", "rec-acme-luks-volume")]
    flags = {s.name: s.flags for s in p.compliance()}
    assert flags["rec-acme-luks-volume"] == ["volume deletion"]
    assert flags["rec-acme-backup-timer"] == ["backup schedule removed"]
    assert flags["rec-acme-nginx-vhost"] == ["public endpoint removed"]
    assert "network deletion" in flags["rec-acme-network"]
    one = preview("tenant-remove-preview")
    assert changed(one) == [("update", "nginx", "rec-acme-nginx-vhost"), ("delete", "container", "rec-acme-preview")]
    assert one.stateful() == []


# --------------------------------------------------------------------------- policy, errors, drift


def test_policy_violation():
    p = preview("tenant-policy-violation")
    assert pv.exit_code(p) == ExitCode.POLICY and not p.changed
    assert sorted((v.policy, v.resource, v.level) for v in p.violations) == [
        ("dn-allowed-registries", "rec-acme-preview", "mandatory"),
        ("dn-allowed-registries", "rec-acme-tagging", "mandatory")]
    assert "registry of 'dn.local/sgtm-standin:1' is not allowed" in p.violations[0].message
    md = pv.render_markdown(p)
    assert md.startswith("<!-- dn-preview -->\n## ⛔ dn preview: policy violation:")
    assert "| `tenant-policy-violation` | 0 | 0 | 0 | 0 | 7 | ⛔ 2 violations |" in md
    assert "⛔ **mandatory** `dn-allowed-registries` on `tenant-policy-violation` `rec-acme-tagging`" in md
    data = json.loads(pv.to_json(p))
    assert data["exit_code"] == 4 and len(data["violations"]) == 2 and data["changed"] is False


def test_failed_preview_is_an_error():
    p = preview("tenant-replace-network-fails")
    assert pv.exit_code(p) == ExitCode.FAILED
    assert "network: must be a network name" in p.stacks[0].error
    md = pv.render_markdown(p)
    assert md.startswith("<!-- dn-preview -->\n## ❌ dn preview: error:") and "### ❌ Errors" in md
    # an error anywhere outweighs a violation elsewhere: the run did not preview everything
    both = preview("tenant-replace-network-fails", "tenant-policy-violation")
    assert pv.exit_code(both) == ExitCode.FAILED and len(both.violations) == 2


def test_drift_from_a_refresh():
    drift = pv.drift_from_events("host--sandbox-eu1", events("host-refresh-drift"))
    (d,) = drift
    assert (d.kind, d.name, d.how) == ("firewall", "sandbox-eu1-firewall-baseline", "changed")
    assert any(c.path == "drift[0]" and "DN-INPUT: rules differ" in c.new for c in d.changes)
    assert "drift: 1 resource changed behind dn's back" in pv.drift_text(drift)
    assert pv.drift_from_events("x", events("host-update-admin-source")) == []  # a preview is no refresh
    assert pv.drift_text([]) == "no drift: the host matches dn's state\n"


# --------------------------------------------------------------------------- the comment limit


def test_huge_diff_is_truncated_explicitly():
    names = ("huge-a", "huge-b", "huge-c", "tenant-move-prefix")
    p = preview(*names)
    md = pv.render_markdown(p)
    assert len(md) < pv.GITHUB_COMMENT_LIMIT
    full = sum(len("\n".join(pv.step_lines(s))) for s in p.steps())
    assert full > pv.GITHUB_COMMENT_LIMIT, "the recorded diff must not fit one comment"
    assert "> **Truncated:** the details of" in md and "did not fit GitHub's 65,536-character comment limit" in md
    # everything above the details is complete: every stack's counts, the stateful and policy parts
    for n in names:
        assert f"| `{n}` |" in md
    assert "- **replace** volume `rec-acme-luks-volume`" in md
    assert md.count("<details>") == md.count("</details>") and md.count("```") % 2 == 0
    # JSON is never truncated: all 50 domains of every huge tenant are there
    data = json.loads(pv.to_json(p))
    for part in "abc":
        stack = next(s for s in data["stacks"] if s["stack"] == f"huge-{part}")
        vhost = next(s for s in stack["steps"] if s["kind"] == "nginx")
        assert sum(1 for c in vhost["changes"] if c["path"].startswith("tenant.domains[")) == 50


def test_small_budget_keeps_structure():
    p = preview("tenant-create", "tenant-destroy")
    md = pv.render_markdown(p, budget=3000)
    assert len(md) < 4000 and "> **Truncated:**" in md
    assert md.count("<details>") == md.count("</details>")


# --------------------------------------------------------------------------- secrets and wholes


@pytest.mark.parametrize("name", sorted(p.stem for p in EVENTS.glob("*.json")))
def test_secrets_never_appear(name):
    text = (EVENTS / f"{name}.json").read_text()
    assert RECORDED_SECRET not in text
    if "refresh" in name:
        return
    p = preview(name)
    out = all_outputs(p)
    assert RECORDED_SECRET not in out
    shown = [c for s in p.steps() for c in s.changes if c.path in ("key", "secret_env")]
    assert all(c.old in (None, "[secret]") and c.new in (None, "[secret]") for c in shown)
    if shown:
        assert "[secret]" in out


def test_several_stacks_together():
    p = preview("host-update-admin-source", "tenant-update-rate-limits", "tenant-create")
    assert pv.totals(p) == {"create": 7, "update": 2, "replace": 0, "delete": 0, "same": 13}
    assert pv.headline(p) == "changes: 7 to create, 2 to update, 0 to replace, 0 to delete (3 stacks)"
    data = json.loads(pv.to_json(p))
    assert [s["stack"] for s in data["stacks"]] == ["host-update-admin-source", "tenant-update-rate-limits",
                                                   "tenant-create"]
    assert data["changed"] is True and data["exit_code"] == 0


def test_no_changes():
    p = pv.preview_from_events({"host--sandbox-eu1": events("host-no-changes")})
    assert not p.changed and pv.exit_code(p) == ExitCode.OK and pv.totals(p)["same"] == 8
    assert pv.render_text(p).startswith("no changes: 0 to create")
    assert json.loads(pv.to_json(p))["changed"] is False
    md = pv.render_markdown(p)
    assert md.startswith("<!-- dn-preview -->\n## ✅ dn preview: no changes") and "<details>" not in md
