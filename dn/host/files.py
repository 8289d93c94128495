"""Small file helpers the appliers share (over a ``dn.ssh.Session``)."""
from __future__ import annotations

import posixpath
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dn.ssh import Session


def drop_stale_backups(session: "Session", paths: Iterable[str]) -> list[str]:
    """Remove the previous versions that interrupted transactions left next to ``paths``
    (``.<name>.dn-prev-<txid>``: the connection dropped before they could be renamed or restored).
    Call it only after a successful apply of those paths. Returns what was removed."""
    from dn.ssh import PREV_MARK

    removed = []
    by_dir: dict[str, list[str]] = {}
    for p in paths:
        d, name = posixpath.split(p)
        by_dir.setdefault(d, []).append(f".{name}{PREV_MARK}-")
    for d, prefixes in by_dir.items():
        if not session.exists(d):
            continue
        for entry in session.listdir(d):
            if any(entry.startswith(pre) for pre in prefixes):
                session.remove(f"{d}/{entry}")
                removed.append(f"{d}/{entry}")
    return removed
