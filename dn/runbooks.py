"""Runbooks: markdown files under runbooks/, listed and printed by `dn runbook`.

Pure helpers: find runbooks, split them into sections addressed like GitHub anchors
(``incident-response#a-lock-is-held``), and extract the dn commands they name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dn.errors import InvalidInput

RUNBOOK_DIR = Path(__file__).resolve().parent.parent / "runbooks"
_CMD_RE = re.compile(r"`(dn(?: [a-z][a-z-]*)+)")


@dataclass(frozen=True)
class Runbook:
    name: str
    title: str
    text: str


def slug(heading: str) -> str:
    """A heading's anchor, as GitHub renders it."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def all_runbooks(directory: Path = RUNBOOK_DIR) -> list[Runbook]:
    out = []
    for p in sorted(directory.glob("*.md")):
        text = p.read_text()
        m = re.search(r"^# (.+)$", text, re.M)
        out.append(Runbook(p.stem, m.group(1).strip() if m else p.stem, text))
    return out


def get(ref: str, directory: Path = RUNBOOK_DIR) -> str:
    """The text of ``name`` or of one section ``name#anchor``."""
    name, _, anchor = ref.partition("#")
    books = {b.name: b for b in all_runbooks(directory)}
    if name not in books:
        raise InvalidInput("runbook", f"no runbook named {name!r}; known: {', '.join(sorted(books))}")
    text = books[name].text
    if not anchor:
        return text
    sections = sections_of(text)
    if anchor not in sections:
        raise InvalidInput("runbook", f"{name} has no section #{anchor}; sections: {', '.join(sections)}")
    return sections[anchor]


def sections_of(text: str) -> dict[str, str]:
    """Second-level sections by anchor (each with its heading)."""
    parts = re.split(r"^(?=## )", text, flags=re.M)
    out = {}
    for part in parts[1:]:
        heading = part.splitlines()[0][3:]
        out[slug(heading)] = part.rstrip() + "\n"
    return out


def commands_named(text: str) -> set[tuple[str, ...]]:
    """Every ``dn noun [verb]`` that appears in inline code, as word tuples without 'dn'."""
    found = set()
    for m in _CMD_RE.finditer(text):
        words = m.group(1).split()[1:]
        found.add(tuple(w for w in words if not w.isupper()))
    return found
