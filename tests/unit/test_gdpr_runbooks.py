"""Every runbook reference in dn.gdpr resolves, and the GDPR runbooks name only real commands."""
from __future__ import annotations

import re
from pathlib import Path

from dn import runbooks

GDPR_DIR = Path(__file__).resolve().parents[2] / "dn" / "gdpr"


def test_runbook_references_in_dn_gdpr_resolve():
    refs = set()
    for p in GDPR_DIR.glob("*.py"):
        text = p.read_text()
        refs |= set(re.findall(r'runbook="([a-z0-9#-]+)"', text))
        refs |= set(re.findall(r'RUNBOOK = "([a-z0-9#-]+)"', text))
    assert {"gdpr-deletion#a-step-fails", "key-rotation"} <= refs
    for ref in refs:
        assert runbooks.get(ref)


def test_the_gdpr_runbooks_cover_request_to_certificate_and_rotation():
    books = {b.name: b for b in runbooks.all_runbooks()}
    gdpr = books["gdpr-deletion"].text
    for cmd in (("gdpr", "delete"), ("gdpr", "status"), ("gdpr", "request"), ("export",)):
        assert cmd in runbooks.commands_named(gdpr), cmd
    assert "what-to-answer-the-customer-and-when" in runbooks.sections_of(gdpr)
    assert "30 days" in gdpr and "10 years" in gdpr
    rot = books["key-rotation"].text
    assert ("keys", "rotate") in runbooks.commands_named(rot) and ("keys", "status") in runbooks.commands_named(rot)
