"""A tenant's encrypted volume (LUKS2 on a backing file), applied over SSH.

Format: LUKS2, ``aes-xts-plain64``, a 512-bit volume key (AES-256 in XTS mode), keyslots
protected with argon2id; cryptsetup's own defaults for the argon2id cost (2 s on the host).
The key is 64 random bytes made by dn (``new_key``); it reaches the host only on the standard
input of ``cryptsetup --key-file=-``, never in a file, an argument, a log line or an error.

An apply (``apply``, after ``read`` and the pure ``plan``):

1. ``allocate``: the backing file is created (mode 0600) and allocated to the plan's size under
   the host prefix (``fallocate``, or ``truncate`` where the filesystem cannot allocate);
2. ``format``: ``cryptsetup isLuks`` is checked right before: an existing LUKS volume is never
   formatted again (formats from stdin give no overwrite warning), and a file that is not LUKS
   is formatted only if its first MiB is blank (the remains of an interrupted create); a LUKS
   header without any keyslot (a format cut short) is formatted anew, since no key opens it;
3. ``verify``: the header is read back (``luksDump``: cipher, key size, argon2id) and the key is
   tested (``open --test-passphrase``);
4. where the kernel's device-mapper answers (``dmsetup version``; ``/dev/mapper/control`` alone
   proves nothing: libdevmapper creates that node even when the kernel has no driver): ``open``, ``mkfs.ext4`` when the opened
   device holds no filesystem yet, and ``mount`` at the tenant's path. Where it does not (the
   sandbox), the plan says so: the volume is formatted and verified but cannot be opened there.

Removal is a crypto-erase: unmount, close, ``cryptsetup erase`` (every keyslot wiped: the data
can never be decrypted again, whatever copies of the file exist), the same for any header backup
next to the file, then the files are removed.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dn.errors import InvalidInput, OperationFailed
from dn.host.plan import Applied, ApplyRefused, Change, Plan, Progress, no_progress
from dn.models import HostBaseline, TenantSpec

if TYPE_CHECKING:
    from dn.ssh import Session

LUKS_TYPE = "luks2"
CIPHER = "aes-xts-plain64"
KEY_BITS = 512
PBKDF = "argon2id"
KEY_BYTES = 64
MIB = 1024 * 1024
HEADER_SUFFIX = ".header"  # header backups live next to the backing file: <image>.header*
DM_MISSING = "device-mapper is not available on this host: the volume is formatted and its key verified, " \
             "but it cannot be opened, formatted with a filesystem or mounted here"


def new_key() -> bytes:
    """A fresh volume key: 64 random bytes."""
    return secrets.token_bytes(KEY_BYTES)


def key_fingerprint(key: bytes) -> str:
    """A non-secret identifier of a key (for state and diffs): a domain-separated SHA-256."""
    return "sha256:" + hashlib.sha256(b"dn-luks-key-v1\0" + key).hexdigest()


def check_key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise InvalidInput("key", f"must be {KEY_BYTES} bytes (made by dn.host.luks.new_key)")
    return bytes(key)


# --------------------------------------------------------------------------- spec and header (pure)


@dataclass(frozen=True)
class VolumeSpec:
    """One tenant's volume on one host; paths are on-host paths with the host prefix applied."""

    name: str
    image: str
    size_mb: int
    mapper: str
    mount: str
    cipher: str = CIPHER
    key_bits: int = KEY_BITS
    pbkdf: str = PBKDF

    @property
    def size(self) -> int:
        return self.size_mb * MIB

    @property
    def mapper_path(self) -> str:
        return f"/dev/mapper/{self.mapper}"

    @property
    def label(self) -> str:
        return f"dn-{self.name}"


def volume_spec(host: HostBaseline, tenant: TenantSpec) -> VolumeSpec:
    """The volume of ``tenant`` on ``host``: size from the plan, paths from dn.models."""
    return VolumeSpec(
        name=tenant.slug,
        image=host.path(tenant.volume_image),
        size_mb=tenant.limits.volume_mb,
        mapper=tenant.mapper_name,
        mount=host.path(tenant.mount_path),
    )


@dataclass(frozen=True)
class Keyslot:
    id: int
    key_bits: int
    cipher: str
    pbkdf: str


@dataclass(frozen=True)
class LuksHeader:
    """What ``cryptsetup luksDump --dump-json-metadata`` says of a LUKS2 header."""

    cipher: str
    key_bits: int | None  # None when no keyslot remains (nothing says the volume key size)
    keyslots: tuple[Keyslot, ...]
    sector_size: int | None = None

    def problems(self, spec: VolumeSpec) -> list[str]:
        """How this header differs from what dn promises (cipher, key size, argon2id)."""
        out = []
        if self.cipher != spec.cipher:
            out.append(f"cipher is {self.cipher}, expected {spec.cipher}")
        if self.key_bits is not None and self.key_bits != spec.key_bits:
            out.append(f"volume key is {self.key_bits} bits, expected {spec.key_bits}")
        for ks in self.keyslots:
            if ks.pbkdf != spec.pbkdf:
                out.append(f"keyslot {ks.id} uses {ks.pbkdf}, expected {spec.pbkdf}")
        return out

    def to_dict(self) -> dict:
        return {"cipher": self.cipher, "key_bits": self.key_bits, "sector_size": self.sector_size,
                "keyslots": [{"id": k.id, "key_bits": k.key_bits, "cipher": k.cipher, "pbkdf": k.pbkdf}
                             for k in self.keyslots]}


def parse_luks_json(text: str) -> LuksHeader:
    """Parse LUKS2 JSON metadata. Raises ValueError if it is not that."""
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON metadata: {e}") from None
    if not isinstance(meta, dict) or "segments" not in meta or "keyslots" not in meta:
        raise ValueError("not LUKS2 JSON metadata (no segments/keyslots)")
    segments = [v for _, v in sorted(meta["segments"].items(), key=lambda kv: int(kv[0]))]
    crypt = next((s for s in segments if s.get("type") == "crypt"), None)
    if crypt is None:
        raise ValueError("no crypt segment")
    slots = []
    for sid, ks in sorted(meta["keyslots"].items(), key=lambda kv: int(kv[0])):
        slots.append(Keyslot(int(sid), int(ks.get("key_size", 0)) * 8,
                             str((ks.get("area") or {}).get("encryption", "")),
                             str((ks.get("kdf") or {}).get("type", ""))))
    return LuksHeader(
        cipher=str(crypt.get("encryption", "")),
        key_bits=slots[0].key_bits if slots else None,
        keyslots=tuple(slots),
        sector_size=int(crypt["sector_size"]) if str(crypt.get("sector_size", "")).isdigit() else None,
    )


# --------------------------------------------------------------------------- state and plan


@dataclass(frozen=True)
class VolumeState:
    exists: bool
    size: int | None = None
    is_luks: bool = False
    header: LuksHeader | None = None
    blank: bool | None = None  # not LUKS: whether the first MiB is all zeros
    dm: bool = False  # device-mapper available on the host
    opened: bool = False
    mounted: bool = False
    header_backups: tuple[str, ...] = ()


def plan(spec: VolumeSpec, state: VolumeState, *, where: str = "host", verify_key: bool = False) -> Plan:
    """The changes that bring the host to ``spec`` (pure). Refusals are notes starting with
    ``refused:``; ``verify_key`` adds a key test even when nothing else changes."""
    changes: list[Change] = []
    notes: list[str] = []
    formatted = state.is_luks
    if not state.exists:
        changes.append(Change("allocate", spec.image, f"missing; {spec.size_mb} MiB"))
        changes.append(Change("format", spec.image, f"new LUKS2 volume ({spec.cipher}, {spec.key_bits}-bit key, {spec.pbkdf})"))
        formatted = True
    elif not state.is_luks:
        if state.blank:
            if (state.size or 0) < spec.size:
                changes.append(Change("allocate", spec.image, f"grow to {spec.size_mb} MiB"))
            changes.append(Change("format", spec.image, "exists, blank and not LUKS yet (an earlier create stopped "
                                                        "before formatting)"))
            formatted = True
        else:
            notes.append(f"refused: {spec.image} exists, is not a LUKS volume and holds data; dn formats only blank files")
    else:
        if state.header is not None and state.header.keyslots:
            notes += [f"refused: {spec.image}: {p}; a volume's format cannot change in place (replace it)"
                      for p in state.header.problems(spec)]
        elif state.header is not None:
            # Nothing can decrypt it any more, so formatting it anew loses nothing: this is what a
            # create killed inside luksFormat (header written, keyslot not yet) leaves behind.
            changes.append(Change("format", spec.image, "a LUKS header with no keyslot (a format cut short, or "
                                                        "an erase): nothing can decrypt it; formatted anew"))
            formatted = True
        if state.size is not None and state.size < spec.size:
            changes.append(Change("grow", spec.image, f"{state.size // MIB} MiB → {spec.size_mb} MiB"))
        elif state.size is not None and state.size > spec.size:
            notes.append(f"refused: {spec.image} is {state.size // MIB} MiB; shrinking to {spec.size_mb} MiB "
                         "would destroy data")
    if any(c.action == "format" for c in changes):
        changes.append(Change("verify", spec.image, "read the header back and test the key"))
    elif verify_key and formatted:
        changes.append(Change("verify", spec.image, "test the key"))
    if state.dm:
        if formatted and not state.opened:
            changes.append(Change("open", spec.mapper_path, "not open"))
            changes.append(Change("mkfs", spec.mapper_path, "ext4, only if the opened volume holds no filesystem"))
        if formatted and not state.mounted:
            changes.append(Change("mount", spec.mount, f"{spec.mapper_path} is not mounted there"))
    elif formatted:
        notes.append(DM_MISSING)
    return Plan(f"volume {spec.name} on {where}", tuple(changes), tuple(notes))


def _ok(s: "Session", argv: list[str], stdin: bytes | None = None) -> bool:
    return s.run(argv, stdin=stdin, check=False).rc == 0


def read_header(session: "Session", path: str) -> LuksHeader | None:
    """The LUKS2 header of ``path`` on the host, or None if it is not LUKS."""
    if not _ok(session, ["cryptsetup", "isLuks", path]):
        return None
    r = session.run(["cryptsetup", "luksDump", "--dump-json-metadata", path])
    try:
        return parse_luks_json(r.text)
    except ValueError as e:
        raise OperationFailed(f"{session.where}: {path}: cannot read its LUKS2 header ({e})") from None


def _blank(s: "Session", path: str, size: int) -> bool:
    n = min(size, MIB)
    return n == 0 or _ok(s, ["cmp", "-s", "-n", str(n), path, "/dev/zero"])


def read(session: "Session", spec: VolumeSpec) -> VolumeState:
    """The volume's state on the host."""
    s = session
    dm = _ok(s, ["dmsetup", "version"]) or _ok(s, ["test", "-e", "/sys/class/misc/device-mapper"])
    opened = dm and _ok(s, ["test", "-e", spec.mapper_path])
    mounted = _ok(s, ["mountpoint", "-q", spec.mount]) if s.exists(spec.mount) else False
    d, base = posixpath.split(spec.image)
    backups = tuple(f"{d}/{n}" for n in (s.listdir(d) if s.exists(d) else ()) if n.startswith(base + HEADER_SUFFIX))
    st = s.stat(spec.image)
    if st is None:
        return VolumeState(False, dm=dm, opened=opened, mounted=mounted, header_backups=backups)
    header = read_header(s, spec.image)
    size = int(st.st_size or 0)
    return VolumeState(True, size, header is not None, header,
                       None if header is not None else _blank(s, spec.image, size),
                       dm, opened, mounted, backups)


# --------------------------------------------------------------------------- apply


def _cryptsetup(s: "Session", argv: list[str], key: bytes, doing: str) -> None:
    from dn.ssh import redact

    r = s.run(["cryptsetup", *argv], stdin=key, check=False)
    if r.rc != 0:
        # cryptsetup does not echo a key read from stdin; removed here all the same, should it ever.
        err = redact(r.stderr.decode("utf-8", "replace"), key).strip()[-600:]
        raise ApplyRefused(f"{s.where}: cryptsetup {doing} failed (exit {r.rc}): {err}")


def _allocate(s: "Session", spec: VolumeSpec) -> None:
    s.mkdir_p(posixpath.dirname(spec.image), mode=0o700)
    if not s.exists(spec.image):
        s.run(["install", "-m", "0600", "/dev/null", spec.image])
    if not _ok(s, ["fallocate", "-l", str(spec.size), spec.image]):
        s.run(["truncate", "-s", str(spec.size), spec.image])  # filesystems without fallocate


def _format(s: "Session", spec: VolumeSpec, key: bytes) -> None:
    # Right before the format, however the plan was made: never format an existing LUKS volume.
    # The one exception: a header with no keyslot, which no key can open any more.
    header = read_header(s, spec.image)
    if header is not None and header.keyslots:
        raise OperationFailed(f"{s.where}: {spec.image} is already a LUKS volume; dn never formats one again",
                              hint="its data is intact; if it must be replaced, delete it first (crypto-erase)")
    st = s.stat(spec.image)
    if header is None and (st is None or not _blank(s, spec.image, int(st.st_size or 0))):
        raise OperationFailed(f"{s.where}: {spec.image} is not blank; refusing to format it")
    _cryptsetup(s, ["luksFormat", "--batch-mode", "--type", LUKS_TYPE, "--cipher", spec.cipher,
                    "--key-size", str(spec.key_bits), "--pbkdf", spec.pbkdf, "--label", spec.label,
                    "--key-file=-", spec.image], key, f"luksFormat of {spec.image}")


def _verify(s: "Session", spec: VolumeSpec, key: bytes) -> LuksHeader:
    header = read_header(s, spec.image)
    if header is None:
        raise ApplyRefused(f"{s.where}: {spec.image} is not a LUKS volume after formatting")
    problems = header.problems(spec)
    if problems:
        raise ApplyRefused(f"{s.where}: {spec.image}: " + "; ".join(problems))
    _cryptsetup(s, ["open", "--test-passphrase", "--key-file=-", spec.image], key,
                f"key test of {spec.image} (the key does not open it)")
    return header


def _open_and_mount(s: "Session", spec: VolumeSpec, key: bytes, the_plan: Plan, progress: Progress) -> None:
    if the_plan.has("open"):
        progress("open")
        _cryptsetup(s, ["open", "--type", LUKS_TYPE, "--key-file=-", spec.image, spec.mapper], key,
                    f"open of {spec.image}")
    if the_plan.has("mkfs"):
        # blkid -p exits 2 when the device holds no recognisable filesystem.
        probe = s.run(["blkid", "-p", spec.mapper_path], check=False)
        if probe.rc == 2:
            progress("mkfs")
            s.run(["mkfs.ext4", "-q", "-L", spec.label, spec.mapper_path])
    if the_plan.has("mount"):
        progress("mount")
        s.mkdir_p(spec.mount, mode=0o750)
        s.run(["mount", "-o", "nodev,nosuid", spec.mapper_path, spec.mount])


def apply(session: "Session", spec: VolumeSpec, the_plan: Plan, key: bytes | None,
          progress: Progress = no_progress) -> Applied:
    """Carry out ``the_plan``. ``key`` is needed for format, verify, open and grow.

    Raises OperationFailed on a refusal (nothing changed), ApplyRefused when cryptsetup refuses,
    InvalidInput without a valid key, Unreachable. The key never appears in an error.
    """
    s = session
    refused = [n.removeprefix("refused: ") for n in the_plan.notes if n.startswith("refused: ")]
    if refused:
        raise OperationFailed(f"{s.where}: {the_plan.resource}: " + "; ".join(refused),
                              hint="nothing was changed on the host")
    done = Applied(the_plan, [n for n in the_plan.notes])
    if the_plan.empty:
        return done
    needs_key = {"format", "verify", "open", "grow"}
    if any(the_plan.has(a) for a in needs_key):
        key = check_key(key) if key is not None else None
        if key is None:
            raise InvalidInput("key", f"is required to {', '.join(a for a in sorted(needs_key) if the_plan.has(a))} "
                                      f"{spec.image}")
    if the_plan.has("allocate"):
        progress("allocate")
        _allocate(s, spec)
    if the_plan.has("format"):
        progress("format")
        _format(s, spec, key)
    if the_plan.has("grow"):
        progress("grow")
        if not _ok(s, ["fallocate", "-l", str(spec.size), spec.image]):
            s.run(["truncate", "-s", str(spec.size), spec.image])
        if s.exists(spec.mapper_path):
            _cryptsetup(s, ["resize", "--key-file=-", spec.mapper], key, f"resize of {spec.mapper}")
            s.run(["resize2fs", spec.mapper_path])
    if the_plan.has("verify"):
        progress("verify")
        _verify(s, spec, key)
    _open_and_mount(s, spec, key, the_plan, progress)
    progress("done")
    return done


def converge(session: "Session", spec: VolumeSpec, key: bytes | None, *, progress: Progress = no_progress,
             verify_key: bool = False) -> Applied:
    """read → plan → apply."""
    state = read(session, spec)
    return apply(session, spec, plan(spec, state, where=session.where, verify_key=verify_key), key, progress)


def removal_plan(spec: VolumeSpec, state: VolumeState, *, where: str = "host") -> Plan:
    """What a crypto-erase of the volume does (pure)."""
    changes = []
    if state.mounted:
        changes.append(Change("umount", spec.mount, "mounted"))
    if state.opened:
        changes.append(Change("close", spec.mapper_path, "open"))
    if state.is_luks:
        changes.append(Change("erase", spec.image, "wipe every keyslot: the data can never be decrypted again"))
    for b in state.header_backups:
        changes.append(Change("erase", b, "header backup: wipe its keyslots, then remove it"))
    if state.exists:
        changes.append(Change("delete", spec.image, "remove the backing file"))
    return Plan(f"volume {spec.name} on {where}", tuple(changes))


def remove(session: "Session", spec: VolumeSpec, *, progress: Progress = no_progress) -> Applied:
    """Crypto-erase and remove the volume and any header backup next to it."""
    s = session
    state = read(s, spec)
    the_plan = removal_plan(spec, state, where=s.where)
    if state.mounted:
        progress("umount")
        s.run(["umount", spec.mount])
    if state.opened:
        progress("close")
        s.run(["cryptsetup", "close", spec.mapper])
    for path in (*state.header_backups, spec.image):
        if not s.exists(path):
            continue
        if _ok(s, ["cryptsetup", "isLuks", path]):
            progress("erase")
            s.run(["cryptsetup", "erase", "--batch-mode", path])
            header = read_header(s, path)
            if header is not None and header.keyslots:
                raise OperationFailed(f"{s.where}: {path}: keyslots remain after cryptsetup erase")
        progress("delete")
        s.remove(path)
    progress("done")
    return Applied(the_plan)
