"""Encryption at rest: every tenant volume and the PostgreSQL data volume are LUKS2 with
AES-256 (aes-xts-plain64, a 512-bit key: XTS splits it into two AES-256 keys).

Tenant volumes are found by name from the registry (``/var/lib/dn/volumes/<slug>.luks`` under
the host prefix) and read with ``cryptsetup luksDump`` (the LUKS2 JSON metadata). The PostgreSQL
volume is found from the database itself: the postmaster on the host that serves the configured
port, its data directory, the device mounted there, and that device's dm-crypt mapping
(``cryptsetup status``). If no such postmaster runs on the host, the database lives elsewhere and
the check cannot see its disk: UNKNOWN, saying so.
"""
from __future__ import annotations

import posixpath
import re
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from dn.verify.core import Status, Unknown, plural
from dn.verify.tenants import registered

if TYPE_CHECKING:
    from dn.verify.probe import Probe

CIPHER = "aes-xts-plain64"
KEY_BITS = 512

# Every postmaster on the host, as "<port> <data directory>" (postmaster.pid line 4 is the port).
_POSTMASTERS = (
    'for p in $(pgrep -x postgres 2>/dev/null); do d=$(readlink "/proc/$p/cwd") || continue; '
    '[ -r "$d/postmaster.pid" ] && printf "%s\\n" "$d"; done | sort -u | '
    'while IFS= read -r d; do printf "%s %s\\n" "$(sed -n 4p "$d/postmaster.pid")" "$d"; done'
)


def dsn_port(dsn: str) -> int:
    """The port of a libpq connection string (URL or key=value form); 5432 when unset."""
    if "://" in dsn:
        try:
            return urlsplit(dsn).port or 5432
        except ValueError:
            return 5432
    m = re.search(r"(?:^|\s)port\s*=\s*'?(\d+)", dsn)
    return int(m.group(1)) if m else 5432


def luks_version(dump_text: str) -> int | None:
    m = re.search(r"^Version:\s*(\d+)", dump_text, re.M)
    return int(m.group(1)) if m else None


def header_findings(label: str, header) -> list[str]:
    """What is wrong with a LUKS2 header (dn.host.luks.LuksHeader) for the claim."""
    fails = []
    if header.cipher != CIPHER:
        fails.append(f"{label}: data cipher {header.cipher or 'none'} (must be {CIPHER})")
    if not header.keyslots:
        fails.append(f"{label}: no keyslot left (the volume can never be opened)")
    bits = sorted({k.key_bits for k in header.keyslots})
    if bits and bits != [KEY_BITS]:
        fails.append(f"{label}: volume key {', '.join(map(str, bits))} bits (must be {KEY_BITS}: AES-256 in XTS mode)")
    return fails


def parse_status(text: str) -> dict[str, str]:
    """``cryptsetup status NAME`` → {type, cipher, keysize, device, ...}."""
    out = {}
    for line in text.splitlines():
        k, sep, v = line.strip().partition(":")
        if sep:
            out[k.strip().lower()] = v.strip()
    return out


def check_volume(probe: "Probe", label: str, path: str, mapper: str | None = None) -> tuple[list[str], list[str]]:
    from dn.host.luks import parse_luks_json

    if probe.session().stat(path) is None:
        return [f"{label}: volume {path} does not exist"], []
    if probe.run(["cryptsetup", "isLuks", path]).rc != 0:
        return [f"{label}: {path} is not a LUKS volume"], []
    version = luks_version(probe.run_ok(["cryptsetup", "luksDump", path], what="cryptsetup luksDump"))
    if version != 2:
        return [f"{label}: {path} is LUKS{version or '?'} (must be LUKS2)"], []
    try:
        header = parse_luks_json(probe.run_ok(["cryptsetup", "luksDump", "--dump-json-metadata", path],
                                              what="cryptsetup luksDump --dump-json-metadata"))
    except ValueError as e:
        return [f"{label}: {path}: unreadable LUKS2 header ({e})"], []
    fails = header_findings(label, header)
    pbkdf = ", ".join(sorted({k.pbkdf for k in header.keyslots})) or "?"
    ev = [] if fails else [f"{label}: {path} LUKS2 {header.cipher}, {header.key_bits}-bit key, "
                           f"{len(header.keyslots)} keyslot(s) ({pbkdf})"]
    if mapper and not fails:
        st = probe.run(["cryptsetup", "status", mapper])
        if st.rc == 0:
            facts = parse_status(st.text)
            ev.append(f"{label}: open as /dev/mapper/{mapper} ({facts.get('type', '?')}, {facts.get('cipher', '?')}, "
                      f"{facts.get('keysize', '?')})")
        else:
            ev.append(f"{label}: not open on this host (no /dev/mapper/{mapper}): its data is not mounted")
    return fails, ev


def postgres_findings(probe: "Probe") -> tuple[list[str], list[str]]:
    port = dsn_port(probe.settings.database.dsn)
    found = []
    for line in probe.run_ok(["sh", "-c", _POSTMASTERS], what="looking for PostgreSQL").splitlines():
        p, _, d = line.strip().partition(" ")
        if p.isdigit() and d:
            found.append((int(p), d))
    match = [d for p, d in found if p == port]
    if not match:
        raise Unknown(f"no PostgreSQL serving port {port} runs on {probe.host_name}: the database's disk "
                      "cannot be inspected from there (check its server the same way)")
    datadir = match[0]
    mnt = probe.run_ok(["findmnt", "-n", "-o", "SOURCE,FSTYPE,TARGET", "--target", datadir], what="findmnt").split()
    if len(mnt) < 3:
        raise Unknown(f"findmnt could not tell what is mounted at {datadir}")
    source, fstype, target = mnt[0], mnt[1], mnt[2]
    label = f"PostgreSQL (port {port}, data {datadir})"
    where = f"{source} ({fstype}) mounted at {target}"
    name = source[len("/dev/mapper/"):] if source.startswith("/dev/mapper/") else source
    st = probe.run(["cryptsetup", "status", name])
    if st.rc != 0:
        return [f"{label} is on {where}, which is not a LUKS (dm-crypt) volume"], []
    facts = parse_status(st.text)
    fails = []
    kind = facts.get("type", "?")
    if kind != "LUKS2":
        fails.append(f"{label} is on {where}: dm-crypt type {kind} (must be LUKS2)")
    if facts.get("cipher") != CIPHER:
        fails.append(f"{label} is on {where}: cipher {facts.get('cipher', '?')} (must be {CIPHER})")
    if not facts.get("keysize", "").startswith(f"{KEY_BITS} "):
        fails.append(f"{label} is on {where}: key {facts.get('keysize', '?')} (must be {KEY_BITS} bits)")
    ev = [] if fails else [f"{label} is on {where}: {kind} {facts.get('cipher')} {facts.get('keysize')} "
                           f"over {facts.get('device', '?')}"]
    return fails, ev


def configured_volumes(probe: "Probe") -> list[str]:
    """Extra on-host paths that must be LUKS2 volumes (settings ``verify.luks_volumes``)."""
    return list(probe.settings.verify.luks_volumes)


def check_luks(probe: "Probe") -> tuple[Status, list[str]]:
    fails, ev = [], []
    base = probe.baseline
    tenants = registered(probe.tenants())
    for t in tenants:
        if t.status == "deleting":
            # a GDPR deletion crypto-erases the volume: a missing or keyless one is its progress
            ev.append(f"tenant {t.slug}: being deleted (GDPR request): its volume is being erased, not judged")
            continue
        f, e = check_volume(probe, f"tenant {t.slug}", base.path(t.volume_image), t.mapper)
        fails += f
        ev += e
    for path in configured_volumes(probe):
        f, e = check_volume(probe, posixpath.basename(path), base.path(path))
        fails += f
        ev += e
    ev.insert(0, f"{plural(len(tenants), 'tenant volume')} on {probe.host_name}")
    try:
        f, e = postgres_findings(probe)
    except Unknown as u:
        if fails:
            return Status.FAIL, fails + ev + [f"PostgreSQL: {u}"]
        raise Unknown(str(u), ev) from None
    fails += f
    ev += e
    return (Status.FAIL if fails else Status.PASS), fails + ev
