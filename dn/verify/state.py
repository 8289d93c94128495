"""Deleted tenants leave no copy of their stack's state (Pulumi history, backups, .bak, work dir)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from dn.verify.core import Status, Unknown, plural

if TYPE_CHECKING:
    from dn.verify.probe import Probe


def check_state_purged(probe: Probe) -> tuple[Status, list[str]]:
    """For every tenant deleted (GDPR) or destroyed (cancelled): no file of the state backend or of
    the stack work dirs names its stack (its state, .bak, backups, history, lock dir, config)."""
    from dn import engine

    settings = probe.settings
    backend = settings.backend_url
    work_root = engine.stack_work_dir(settings, "x").parent
    if engine.backend_dir(backend) is None:
        raise Unknown(f"the state backend {backend} is not a directory dn can list; its stacks' backups and "
                      "history are removed by `pulumi stack rm --remove-backups`, not checked here")
    gone = probe.query("SELECT slug, status FROM tenants WHERE status IN ('deleted', 'cancelled') ORDER BY slug",
                       what="reading tenants")
    fails, ev = [], []
    for t in gone:
        left = engine.stack_copies(backend, work_root, t["slug"])
        if left is None:
            raise Unknown(f"tenant {t['slug']}: not a stack name dn can search for")
        if left:
            fails.append(f"tenant {t['slug']} ({t['status']}): {plural(len(left), 'file')} of its stack remain: "
                         + ", ".join(left[:5]) + (" ..." if len(left) > 5 else ""))
    ev.append(f"{plural(len(gone), 'deleted or destroyed tenant')}; searched {engine.backend_dir(backend)} and "
              f"{work_root}")
    return (Status.FAIL if fails else Status.PASS), fails + ev
