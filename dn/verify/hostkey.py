"""ssh.host-key: the host is the one its pin in the current configuration names, and it no longer
serves a key the configuration revoked.

dn connects only with the configuration's pin (never one recorded in a stack's state), so what
the live host can show is: the key it presents for each key type (one handshake per type, no
login), each compared with the configuration's pinned and ``@revoked`` keys. A revoked key still
served under any type means the host was not re-keyed after the compromise; no pinned key at all
means dn refuses every connection to it.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dn.verify.core import Status, Unknown

if TYPE_CHECKING:
    from dn.verify.probe import Probe


def check_host_key(probe: Probe) -> tuple[Status, list[str]]:
    from dn import ssh

    host = probe.host
    text = None
    if host.known_hosts:
        try:
            text = Path(host.known_hosts).read_text()
        except OSError as e:
            raise Unknown(f"known_hosts {host.known_hosts}: cannot read: {e.strerror}") from None
    pins = ssh.pinned_keys_for(host.address, host.port, host.host_key, text,
                               str(host.known_hosts) if host.known_hosts else None)
    offered = ssh.offered_host_keys(host)
    fails: list[str] = []
    ev = [(f"pinned in {' and '.join(pins.sources) or 'nothing'}: "
           f"{', '.join(k.fingerprint for k in pins.keys if k not in pins.revoked) or 'no key'}; "
           f"revoked: {', '.join(k.fingerprint for k in pins.revoked) or 'none'}")]
    for kind, key in offered.items():
        if key is None:
            ev.append(f"{kind}: the host has no key of this type")
            continue
        if key in pins.revoked:
            fails.append(f"the host still presents the REVOKED key {key.describe()} ({kind}): re-key it "
                         "(runbook host-key-compromise)")
        state = "revoked" if key in pins.revoked else "pinned" if key in pins.keys else "not pinned (never accepted)"
        ev.append(f"{kind}: {key.describe()}: {state}")
    trusted = [k for k in offered.values() if k is not None and k in pins.keys and k not in pins.revoked]
    if not trusted:
        fails.append("the host presents no key pinned in the configuration: dn refuses every connection to it "
                     "(runbook host-key-compromise)")
    return (Status.FAIL if fails else Status.PASS), fails + ev
