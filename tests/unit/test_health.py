"""dn health: parsing docker's view and the alert transitions (down once, recovered once)."""
import pytest

from dn.health import TenantHealth, parse_inspect, transitions


@pytest.mark.parametrize(
    "text, expected",
    [
        ("/dn-a-tagging running healthy\n/dn-a-preview running healthy\n", {"dn-a-tagging": "healthy", "dn-a-preview": "healthy"}),
        ("/dn-a-tagging running unhealthy\n", {"dn-a-tagging": "unhealthy", "dn-a-preview": "missing"}),
        ("/dn-a-tagging exited healthy\n/dn-a-preview running starting\n", {"dn-a-tagging": "stopped", "dn-a-preview": "starting"}),
        ("/dn-a-tagging running none\n", {"dn-a-tagging": "no-healthcheck", "dn-a-preview": "missing"}),
        ("Error: No such object: dn-a-tagging\n", {"dn-a-tagging": "missing", "dn-a-preview": "missing"}),
    ],
)
def test_parse_inspect(text, expected):
    assert parse_inspect(text, ["dn-a-tagging", "dn-a-preview"]) == expected


def result(ok: bool) -> TenantHealth:
    return TenantHealth("acme", "eu1", {"dn-acme-tagging": "healthy" if ok else "unhealthy"}, "200" if ok else "502")


def test_alert_once_after_n_failures_and_once_on_recovery():
    state, sent = {}, []
    for ok in [False, False, False, False, True, True, False]:
        state, alerts = transitions(state, [result(ok)], alert_after=3)
        sent.append([k for k, _ in alerts])
    assert sent == [[], [], ["down"], [], ["recovered"], [], []]
    assert state["acme"] == {"failures": 1, "alerted": False}


def test_ok_needs_public_path_and_every_container():
    assert TenantHealth("a", "h", {"x": "healthy"}, "200").ok
    assert not TenantHealth("a", "h", {"x": "healthy"}, "502").ok
    assert not TenantHealth("a", "h", {"x": "healthy", "y": "missing"}, "200").ok
