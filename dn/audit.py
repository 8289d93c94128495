"""The append-only, tamper-evident audit log of privileged actions.

Every privileged command runs inside :func:`privileged`, which takes the tenant's/host's lock
(:mod:`dn.locks`), runs the body and appends exactly one entry with the outcome — also when the
body raises or is interrupted — then releases the lock.

An entry holds: the time (from the database clock), the actor (``Context.actor``) and the SHA256
fingerprint of the operator's SSH public key, the command, its arguments with secrets and
personal data redacted (:func:`redact`), tenant, host, outcome (ok / failed / interrupted) and
exit code, request id, pid and machine. Its ``hash`` is SHA-256 over a canonical JSON encoding of
all those fields plus the previous entry's hash, so changing, removing, inserting or reordering
any entry breaks the chain. Appends take one advisory lock, and a trigger accepts an entry only
if it extends the chain head, so concurrent writers never fork the chain.

Retention: :func:`prune` removes entries older than ``retention.audit_days`` only after writing an
*anchor* — the last pruned entry's seq and hash and the database's own signing time, signed with
an Ed25519 key kept in ``<data_dir>/audit/`` — so the remaining chain stays verifiable from it.
The database refuses to prune entries younger than the configured retention (a floor only its
owner role sets, at ``dn db init``), whoever calls it.

Trust: an anchor or witness counts only when its key is pinned in the configuration
(``audit.anchor_keys``; ``dn audit key`` prints this machine's). Without pinned keys, or without
the second region, verification fails: it cannot tell a forged prune or a rewritten tail from a
real one.

:func:`verify` names every modified, missing, inserted or reordered entry. It also compares the
chain with the head row kept by the database, with the newest *witness* in the second region
(``audit-witness/<seq>-<hash>.json``: a signed head seq and hash, one new file per witness, which
someone holding only the database cannot rewrite) and with this machine's witness file; the
witnesses reveal a refilled, rewritten or cut-off chain even when the head row was edited too.
A clean verification on a machine whose anchor key is pinned adds a new witness in the region.
What a hash chain cannot reveal: entries appended after the newest witness, then removed or
rewritten by someone who also moves the head row (the window is the time between witnesses).
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import os
import re
import socket
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from enum import Enum
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from dn.errors import ConfigError, DnError, InvalidInput, OperationFailed, PolicyViolation

if TYPE_CHECKING:
    from dn.backup.store import Store
    from dn.config import Settings
    from dn.context import Context
    from dn.db import Connection

GENESIS = "0" * 64
FORMAT = 1
CHAIN_LOCK = int.from_bytes(b"dn:audit", "big")  # also in dn/schema/002_audit.sql
KEY_PREFIX = "ed25519:"  # how audit.anchor_keys spells a pinned key
WITNESS_CONTEXT = b"dn audit witness v1\n"
WITNESS_DIR = "audit-witness"  # in the second region (dn.backup.store)
_WITNESS_NAME = re.compile(r"^(restore-)?(\d{12})-([0-9a-f]{64})\.json$")
RESTORE_CONTEXT = b"dn audit restore v1\n"
REDACTED = "[redacted]"
PERSONAL = "[personal data redacted]"
MAX_STRING = 1000
ANCHOR_CONTEXT = b"dn audit anchor v1\n"

# -- redaction (pure) ----------------------------------------------------------------------------
# A key is secret when its name contains one of these anywhere (PGPASSWORD, x_api_key, ...) ...
_SECRET_SUBSTRINGS = ("password", "passwd", "passphrase", "secret", "token", "apikey", "privatekey",
                      "credential", "containerconfig", "signature", "fernet")
# ... or has one of these as a word (api-key, key, ssh_key; but not "keyboard" or "monkey") ...
_SECRET_WORDS = {"key", "keys", "pwd", "pass", "auth", "authorization", "bearer", "salt", "otp", "totp",
                 "pin", "cookie", "session", "sessionid", "cert", "pem", "dsn"}
# ... unless its last word says it only names or points at a secret (key_id, passphrase_file).
_POINTER_WORDS = {"id", "ids", "path", "paths", "file", "files", "fingerprint", "fingerprints", "fp",
                  "name", "names", "env", "type", "kind", "count", "length", "age", "version", "rotated",
                  "expires", "created", "at", "dir", "source"}
# Words that stay secret whatever follows: a session id or cookie value is a bearer credential.
_BEARER_WORDS = {"cookie", "session", "sessionid"}
# Keys that hold personal data of end users or customers' people (never in the audit log).
_PERSONAL_KEYS = {"email", "emails", "emailaddress", "phone", "telephone", "mobile", "clientip",
                  "remoteaddr", "useragent", "cookieid", "fullname", "firstname", "lastname",
                  "surname", "displayname", "billingname", "billingaddress", "postaladdress", "street", "birthdate",
                  "dateofbirth", "personname", "contactname"}

_TOKEN_PATTERNS = [
    re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----"),
    re.compile(r"^gAAAAA[A-Za-z0-9_-]{40,}={0,2}$"),                    # Fernet token
    re.compile(r"^eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*$"),  # JWT
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),                                 # AWS access key id
    re.compile(r"\b(gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})\b"),
    re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}\b"),
    re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{20,}\b"),
    re.compile(r"^[A-Za-z0-9_-]{43}=$"),                                  # Fernet key (32 bytes, base64url)
]
_URL_PASSWORD = re.compile(r"(?P<pre>[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)[^/\s@]+(?P<post>@)")
_INLINE_SECRET = re.compile(
    r"(?i)(?P<k>\b[\w.-]*(?:password|passwd|passphrase|secret|token|api[_-]?key|pwd)[\w.-]*\s*[=:]\s*)"
    r"(?P<v>\"[^\"]*\"|'[^']*'|[^\s,;&]+)")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_TOKENISH = re.compile(r"^[A-Za-z0-9+/=_.~-]{24,}$")


def _words(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    return [w for w in re.split(r"[^a-z0-9]+", spaced.lower()) if w]


def is_secret_key(name: str) -> bool:
    """Whether a mapping key names a secret (passphrase, api_key, container_config, ...)."""
    words = _words(name)
    if not words:
        return False
    if any(w in _BEARER_WORDS for w in words):
        return True
    if words[-1] in _POINTER_WORDS and len(words) > 1:
        return False
    joined = "".join(words)
    return any(s in joined for s in _SECRET_SUBSTRINGS) or any(w in _SECRET_WORDS for w in words)


def is_personal_key(name: str) -> bool:
    """Whether a mapping key names personal data (email, owner_email, client_ip, billing_address, ...)."""
    joined = "".join(_words(name))
    return any(joined.endswith(k) for k in _PERSONAL_KEYS)


def _entropy(s: str) -> float:
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def looks_secret(value: str) -> bool:
    """Whether a string on its own looks like a credential: a private key, a Fernet or JWT
    token, a well-known provider token, or a long random-looking token."""
    v = value.strip()
    if any(p.search(v) for p in _TOKEN_PATTERNS):
        return True
    if _TOKENISH.match(v) and not re.fullmatch(r"[0-9a-fA-F-]+", v):
        # Hex digests and UUIDs are identifiers, not secrets; a random token mixes cases and digits.
        classes = sum(bool(re.search(p, v)) for p in (r"[a-z]", r"[A-Z]", r"[0-9]"))
        if classes == 3 and _entropy(v) >= 3.5:
            return True
    return False


def _redact_string(s: str) -> str:
    if looks_secret(s):
        return REDACTED
    s = _URL_PASSWORD.sub(lambda m: m.group("pre") + REDACTED + m.group("post"), s)
    s = _INLINE_SECRET.sub(lambda m: m.group("k") + REDACTED, s)
    s = _BEARER.sub(lambda m: m.group(1) + " " + REDACTED, s)
    s = _EMAIL.sub("[email redacted]", s)
    return s


def redact(value: Any, key: str | None = None) -> Any:
    """A copy of ``value`` (normalized JSON data) with secrets and personal data replaced.

    Whole values are replaced under secret keys (passphrase, password, secret, token, key,
    container_config, ...) and personal-data keys (email, client_ip, ...); any string that looks
    like a credential is replaced wherever it appears; passwords in URLs, ``password=...`` pairs,
    bearer tokens and e-mail addresses are cut out of longer strings.
    """
    if key is not None:
        if is_personal_key(key):
            return PERSONAL if value not in (None, "", [], {}) else value
        if is_secret_key(key):
            return REDACTED if value not in (None, "", [], {}) else value
    if isinstance(value, dict):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _redact_string(value)
    return value


def normalize(value: Any, _depth: int = 0) -> Any:
    """Plain JSON data that survives a round trip through jsonb unchanged (so the hash does):
    dicts with str keys, lists, str, int, bool and None. Floats become strings (jsonb would
    turn 1e300 into an integer), bytes are never logged, other objects become their str()."""
    if _depth > 12:
        return "[nested too deep]"
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        s = value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
        return s if len(s) <= MAX_STRING else s[:MAX_STRING] + "…[truncated]"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"[{len(value)} bytes]"
    if isinstance(value, Enum):
        return normalize(value.value, _depth + 1)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, PurePath):
        return normalize(str(value), _depth + 1)
    if isinstance(value, Mapping):
        return {normalize(str(k)): normalize(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((normalize(v, _depth + 1) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, (list, tuple)):
        return [normalize(v, _depth + 1) for v in value]
    dump = getattr(value, "model_dump", None)  # pydantic models
    if callable(dump):
        return normalize(dump(mode="json"), _depth + 1)
    return normalize(str(value), _depth + 1)


def clean_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """What goes into an entry's ``args``: normalized, then redacted."""
    return redact(normalize(dict(args)))


# -- entries and hashing (pure) ------------------------------------------------------------------
def canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _ts(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="microseconds")


HASHED_FIELDS = ("format", "seq", "at", "actor", "actor_key", "command", "args", "tenant", "host",
                 "outcome", "exit_code", "request_id", "pid", "machine", "prev_hash")


@dataclass(frozen=True)
class Entry:
    seq: int
    at: datetime
    actor: str
    actor_key: str | None
    command: str
    args: dict[str, Any]
    tenant: str | None
    host: str | None
    outcome: str
    exit_code: int
    request_id: str
    pid: int
    machine: str
    prev_hash: str
    hash: str = ""
    format: int = FORMAT

    def hashed(self) -> dict[str, Any]:
        d = {f: getattr(self, f) for f in HASHED_FIELDS}
        d["at"] = _ts(self.at)
        return d

    def compute_hash(self) -> str:
        return hashlib.sha256(canonical(self.hashed())).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        d = self.hashed()
        d["hash"] = self.hash
        return d

    @classmethod
    def from_row(cls, r: Mapping[str, Any]) -> "Entry":
        return cls(**{k: r[k] for k in cls.__dataclass_fields__})


def entry_hash(e: Entry) -> str:
    """SHA-256 (hex) over the canonical encoding of the entry's fields, including prev_hash."""
    return e.compute_hash()


@dataclass(frozen=True)
class Anchor:
    anchor_seq: int
    anchor_hash: str
    anchor_at: datetime
    pruned_from: int
    pruned_count: int
    signed_at: datetime
    public_key: str
    signature: str

    def message(self) -> bytes:
        return ANCHOR_CONTEXT + canonical({
            "anchor_seq": self.anchor_seq, "anchor_hash": self.anchor_hash, "anchor_at": _ts(self.anchor_at),
            "pruned_from": self.pruned_from, "pruned_count": self.pruned_count, "signed_at": _ts(self.signed_at)})

    def signature_valid(self) -> bool:
        return _ed25519_valid(self.public_key, self.message(), self.signature)

    def to_dict(self) -> dict[str, Any]:
        return {"anchor_seq": self.anchor_seq, "anchor_hash": self.anchor_hash, "anchor_at": _ts(self.anchor_at),
                "pruned_from": self.pruned_from, "pruned_count": self.pruned_count,
                "signed_at": _ts(self.signed_at), "key_fingerprint": key_fingerprint(self.public_key)}

    @classmethod
    def from_row(cls, r: Mapping[str, Any]) -> "Anchor":
        return cls(**{k: r[k] for k in cls.__dataclass_fields__})


def key_fingerprint(public_key_b64: str) -> str:
    """SHA256:<base64> of a raw Ed25519 public key, like ssh-keygen prints."""
    try:
        raw = base64.b64decode(public_key_b64, validate=True)
    except ValueError:
        return "invalid"
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


@dataclass(frozen=True)
class Witness:
    """The last entry this machine wrote or verified: seq, hash and when it saw it."""

    seq: int
    hash: str
    seen_at: str


@dataclass(frozen=True)
class SignedWitness:
    """A witness kept in the second region: the chain's head seq and hash, signed."""

    seq: int
    hash: str
    witnessed_at: str
    public_key: str
    signature: str
    # A restore record (`dn audit accept-restore`): the chain was restored to seq/hash, and the
    # entries after it up to lost_seq, which earlier witnesses saw, went with the restore.
    lost_seq: int | None = None
    lost_hash: str | None = None

    @property
    def name(self) -> str:
        return f"{'restore-' if self.lost_seq is not None else ''}{self.seq:012d}-{self.hash}.json"

    def message(self) -> bytes:
        d: dict[str, Any] = {"seq": self.seq, "hash": self.hash, "witnessed_at": self.witnessed_at}
        if self.lost_seq is None:
            return WITNESS_CONTEXT + canonical(d)
        return RESTORE_CONTEXT + canonical({**d, "lost_seq": self.lost_seq, "lost_hash": self.lost_hash})

    def supersedes(self, other: "SignedWitness") -> bool:
        """Whether this restore record makes ``other`` (a witness of entries lost with the restore,
        written before it) no longer binding."""
        return (self.lost_seq is not None and self.seq < other.seq <= self.lost_seq
                and datetime.fromisoformat(other.witnessed_at) < datetime.fromisoformat(self.witnessed_at))

    def signature_valid(self) -> bool:
        return _ed25519_valid(self.public_key, self.message(), self.signature)

    def to_json(self) -> bytes:
        d = {"format": FORMAT, "seq": self.seq, "hash": self.hash, "witnessed_at": self.witnessed_at,
             "public_key": self.public_key, "signature": self.signature}
        if self.lost_seq is not None:
            d.update(lost_seq=self.lost_seq, lost_hash=self.lost_hash)
        return canonical(d) + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> "SignedWitness":
        d = json.loads(raw)
        lost = d.get("lost_seq")
        return cls(int(d["seq"]), str(d["hash"]), str(d["witnessed_at"]), str(d["public_key"]), str(d["signature"]),
                   None if lost is None else int(lost), None if lost is None else str(d["lost_hash"]))

    def as_witness(self) -> Witness:
        return Witness(self.seq, self.hash, self.witnessed_at)

    def to_dict(self) -> dict[str, Any]:
        d = {"seq": self.seq, "hash": self.hash, "witnessed_at": self.witnessed_at,
             "key_fingerprint": key_fingerprint(self.public_key)}
        if self.lost_seq is not None:
            d.update(lost_seq=self.lost_seq, lost_hash=self.lost_hash)
        return d


def _ed25519_valid(public_key: str, message: bytes, signature: str) -> bool:
    # libsodium (PyNaCl) rather than OpenSSL: OpenSSL accepted an all-zero (small-order) public
    # key with an all-zero signature, which any forger can write; libsodium rejects small-order
    # keys and non-canonical signatures.
    from nacl.exceptions import CryptoError
    from nacl.signing import VerifyKey

    try:
        VerifyKey(base64.b64decode(public_key, validate=True)).verify(message, base64.b64decode(signature, validate=True))
        return True
    except (CryptoError, ValueError, TypeError):
        return False


@dataclass(frozen=True)
class Problem:
    kind: str  # modified | missing | inserted | broken-link | out-of-order | head | witness | anchor | unverified
    seq: int | None
    detail: str

    def __str__(self) -> str:
        return f"#{self.seq}: {self.detail}" if self.seq is not None else self.detail


@dataclass
class VerifyResult:
    checked: int
    first_seq: int | None
    last_seq: int
    head_seq: int | None
    head_hash: str | None
    anchor: Anchor | None
    anchors: int
    trusted_keys: int
    witness: Witness | None
    problems: list[Problem] = field(default_factory=list)
    region_witness: SignedWitness | None = None  # the newest valid one checked
    recorded: SignedWitness | None = None  # the witness this verification added to the region

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "checked": self.checked, "first_seq": self.first_seq, "last_seq": self.last_seq,
            "head_seq": self.head_seq, "head_hash": self.head_hash,
            "anchor": self.anchor.to_dict() if self.anchor else None, "anchors": self.anchors,
            "trusted_anchor_keys": self.trusted_keys,
            "witness": {"seq": self.witness.seq, "hash": self.witness.hash, "seen_at": self.witness.seen_at}
            if self.witness else None,
            "region_witness": self.region_witness.to_dict() if self.region_witness else None,
            "recorded_witness": self.recorded.to_dict() if self.recorded else None,
            "problems": [{"kind": p.kind, "seq": p.seq, "detail": p.detail} for p in self.problems],
        }


def _span(a: int, b: int) -> str:
    return f"entry #{a} is" if a == b else f"entries #{a}..#{b} are"


def verify_chain(entries: Sequence[Entry], *, head: tuple[int, str] | None = None,
                 anchors: Sequence[Anchor] = (), trusted_keys: set[str] | None = None,
                 witness: Witness | None = None, region: SignedWitness | None = None) -> VerifyResult:
    """Check a chain (entries in seq order) and name every entry that breaks it.

    ``trusted_keys`` are the pinned anchor keys (base64): an anchor signed by any other key, or
    any anchor at all when none is pinned, is a problem. ``witness`` is this machine's record,
    ``region`` the newest signed witness from the second region (its signature is checked by
    the caller)."""
    problems: list[Problem] = []
    base_seq, base_hash, base_at = 0, GENESIS, None
    expected_from = 1
    for a in sorted(anchors, key=lambda a: a.anchor_seq):
        where = f"anchor over #{a.pruned_from}..#{a.anchor_seq}"
        if not a.signature_valid():
            problems.append(Problem("anchor", a.anchor_seq, f"{where}: signature does not verify (anchor forged or altered)"))
        elif not trusted_keys:
            problems.append(Problem("anchor", a.anchor_seq, f"{where}: signed by {key_fingerprint(a.public_key)}, but "
                                                             "no anchor key is pinned (audit.anchor_keys)"))
        elif a.public_key not in trusted_keys:
            problems.append(Problem("anchor", a.anchor_seq, f"{where}: signed by {key_fingerprint(a.public_key)}, "
                                                             "which is not a pinned anchor key (audit.anchor_keys)"))
        if a.pruned_from != expected_from:
            problems.append(Problem("missing", expected_from, f"{_span(expected_from, a.pruned_from - 1)} "
                                    "missing: removed without an anchor" if a.pruned_from > expected_from else
                                    f"{where} overlaps the previous anchor"))
        if a.pruned_count != a.anchor_seq - a.pruned_from + 1:
            problems.append(Problem("anchor", a.anchor_seq, f"{where}: count {a.pruned_count} does not match its range"))
        expected_from = a.anchor_seq + 1
        base_seq, base_hash, base_at = a.anchor_seq, a.anchor_hash, a.anchor_at

    prev_hash, expected, prev_at = base_hash, base_seq + 1, base_at
    checked = 0
    for e in entries:
        if e.seq <= base_seq:
            problems.append(Problem("inserted", e.seq, f"is present although the anchor says the chain was pruned up to #{base_seq}"))
            continue
        checked += 1
        gap = e.seq > expected
        if gap:
            problems.append(Problem("missing", expected, f"{_span(expected, e.seq - 1)} missing (deleted)"))
        if e.compute_hash() != e.hash:
            problems.append(Problem("modified", e.seq, "contents do not match its hash (entry modified or forged)"))
        if e.prev_hash != prev_hash and not gap:
            before = "the anchor" if e.seq == base_seq + 1 and base_seq else f"#{e.seq - 1}"
            problems.append(Problem("broken-link", e.seq, f"is not chained to {before}: the entry before it was "
                                                          "replaced, or an entry was inserted or reordered"))
        if prev_at is not None and e.at < prev_at:
            problems.append(Problem("out-of-order", e.seq, "is dated before the entry preceding it (reordered)"))
        prev_hash, expected, prev_at = e.hash, e.seq + 1, e.at
    last_seq = expected - 1

    if head is not None:
        hs, hh = head
        if hs > last_seq:
            problems.append(Problem("missing", last_seq + 1, f"{_span(last_seq + 1, hs)} missing: the chain head "
                                                             f"records #{hs} (tail deleted)"))
        elif hs < last_seq:
            problems.append(Problem("inserted", hs + 1, f"{_span(hs + 1, last_seq)} beyond the chain head #{hs}: "
                                                        "not appended through dn (forged)"))
        elif hh != prev_hash:
            problems.append(Problem("head", hs, "the chain head's hash differs from this entry's (head or entry altered)"))
    for who, w in (("this machine", witness), ("the second region's witness", region.as_witness() if region else None)):
        if w is None:
            continue
        if w.seq > last_seq:
            problems.append(Problem("witness", w.seq, f"{who} saw the chain reach #{w.seq} on "
                                    f"{w.seen_at}; it now ends at #{last_seq} (tail deleted)"))
        elif w.seq > base_seq:
            seen = next((e for e in entries if e.seq == w.seq), None)
            if seen is not None and seen.hash != w.hash:
                problems.append(Problem("witness", w.seq, f"differs from the hash {who} recorded on "
                                        f"{w.seen_at} (history rewritten)"))
        elif w.seq == base_seq and base_seq and w.hash != base_hash:
            problems.append(Problem("witness", w.seq, f"the anchor's hash differs from the one {who} "
                                                      f"recorded on {w.seen_at}"))

    live = [e for e in entries if e.seq > base_seq]
    return VerifyResult(
        checked=checked, first_seq=live[0].seq if live else None, last_seq=last_seq,
        head_seq=head[0] if head else None, head_hash=head[1] if head else None,
        anchor=max(anchors, key=lambda a: a.anchor_seq) if anchors else None, anchors=len(anchors),
        trusted_keys=len(trusted_keys) if trusted_keys else 0, witness=witness, problems=problems,
        region_witness=region)


_DURATION = re.compile(r"^\s*(\d{1,6})\s*(m|min|h|d|w)\s*$")


def parse_since(text: str, now: datetime) -> datetime:
    """``--since`` as a date (2026-01-31), a time (2026-01-31T12:00Z) or a duration back from now
    (90m, 12h, 7d, 2w). Dates and times without a zone are UTC."""
    m = _DURATION.match(text)
    if m:
        n, unit = int(m.group(1)), m.group(2)
        delta = {"m": timedelta(minutes=n), "min": timedelta(minutes=n), "h": timedelta(hours=n),
                 "d": timedelta(days=n), "w": timedelta(weeks=n)}[unit]
        return now - delta
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text.strip()):
            return datetime.combine(date.fromisoformat(text.strip()), datetime.min.time(), timezone.utc)
        t = datetime.fromisoformat(text.strip())
        return t if t.tzinfo else t.replace(tzinfo=timezone.utc)
    except ValueError:
        raise InvalidInput("--since", f"{text!r} is not a date (2026-01-31), a time (2026-01-31T12:00Z) "
                                      "or a duration (90m, 12h, 7d, 2w)") from None


# -- keys and local files ------------------------------------------------------------------------
def audit_dir(settings: "Settings") -> Path:
    return settings.data_dir / "audit"


def _private_dir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    return p


def anchor_key_path(settings: "Settings") -> Path:
    return audit_dir(settings) / "anchor_ed25519"


def anchor_key(settings: "Settings", *, create: bool = True):
    """dn's Ed25519 anchor signing key (PKCS#8 PEM, mode 0600), created on first use; its public
    key is written beside it (``anchor_ed25519.pub``, raw key in base64)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = anchor_key_path(settings)
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise OperationFailed(f"{path}: the anchor key must be readable by its owner only (chmod 600)")
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise OperationFailed(f"{path}: not an Ed25519 private key")
        return key
    if not create:
        return None
    _private_dir(path.parent)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another dn process made it first
        return anchor_key(settings, create=False)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    path.with_suffix(".pub").write_text(public_key_b64(key) + "\n")
    return key


def public_key_b64(private_key) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def pinned_key(public_b64: str) -> str:
    """How ``audit.anchor_keys`` spells a public key: ``ed25519:<base64>``."""
    return KEY_PREFIX + public_b64


def trusted_anchor_keys(settings: "Settings") -> set[str]:
    """The public keys (base64) pinned in ``audit.anchor_keys``: the only ones whose anchors and
    witnesses count. Not this machine's own key unless pinned: a key file anyone can replace is
    no anchor of trust, and a machine without it (CI, a second operator) must judge the same."""
    return {k[len(KEY_PREFIX):] for k in settings.audit.anchor_keys}


UNVERIFIED_HINT = ('set [audit] anchor_keys = ["ed25519:..."] to the key `dn audit key` prints on the machine that '
                   'prunes and witnesses the log, and configure [backup] (the second region); see README, Configuration')
_KEYS_HINT = ('pin the key of the installation that prunes and witnesses the log: run `dn audit key` there and '
              'add what it prints to the configuration, [audit] anchor_keys = ["ed25519:..."] '
              '(or DN__AUDIT__ANCHOR_KEYS)')


def signing_key(settings: "Settings", *, create: bool = False):
    """This machine's anchor key when it is pinned in ``audit.anchor_keys``, else None."""
    key = anchor_key(settings, create=create)
    if key is None or public_key_b64(key) not in trusted_anchor_keys(settings):
        return None
    return key


def operator_key_fingerprint(settings: "Settings", host: str | None = None) -> str | None:
    """SHA256 fingerprint (as ssh-keygen -l prints it) of the operator's SSH public key
    ``<key_path>.pub`` for ``host`` (else the default host), when that file exists and parses."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    cfg = settings.hosts.get(host) if host else None
    cfg = cfg or settings.hosts.get(settings.default_host)
    if cfg is None:
        return None
    try:
        data = Path(str(cfg.key_path) + ".pub").read_bytes()
        key = serialization.load_ssh_public_key(data.strip())
    except (OSError, ValueError, UnsupportedAlgorithm):
        return None
    blob = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    return "SHA256:" + base64.b64encode(hashlib.sha256(base64.b64decode(blob)).digest()).decode().rstrip("=")


def witness_path(settings: "Settings") -> Path:
    from dn import db

    ident = hashlib.sha256(db.describe_dsn(settings.database.dsn).split("@", 1)[-1].encode()).hexdigest()[:16]
    return audit_dir(settings) / f"witness-{ident}.json"


def read_witness(settings: "Settings") -> Witness | None:
    p = witness_path(settings)
    try:
        d = json.loads(p.read_text())
        return Witness(int(d["seq"]), str(d["hash"]), str(d["seen_at"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        raise OperationFailed(f"{p}: the audit witness file is unreadable",
                              hint="move it aside and run `dn audit verify`") from None


def _record_witness(settings: "Settings", seq: int, hash_: str) -> None:
    """Move this machine's witness forward (never back): a later verify checks the chain still
    holds this entry unchanged."""
    p = witness_path(settings)
    try:
        current = read_witness(settings)
    except OperationFailed:
        current = None
    if current is not None and current.seq >= seq:
        return
    _private_dir(p.parent)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"seq": seq, "hash": hash_, "seen_at": _ts(datetime.now(timezone.utc))}) + "\n")
    os.replace(tmp, p)


# -- appending -----------------------------------------------------------------------------------
_COLUMNS = ("seq", "at", "actor", "actor_key", "command", "args", "tenant", "host", "outcome", "exit_code",
            "request_id", "pid", "machine", "prev_hash", "hash", "format")


def append(conn: "Connection", *, actor: str, actor_key: str | None, command: str, args: Mapping[str, Any],
           tenant: str | None, host: str | None, outcome: str, exit_code: int, request_id: str) -> Entry:
    """Append one entry (args are cleaned here) and return it. Serialized by the chain lock."""
    from dn import db

    if outcome not in ("ok", "failed", "interrupted"):
        raise ValueError(f"outcome {outcome!r}")
    with db.translate_errors("writing the audit entry"), conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHAIN_LOCK,))
        head = db.row(conn, "SELECT seq, hash, greatest(clock_timestamp(), at) AS now FROM audit_head")
        if head is None:
            raise OperationFailed("the audit chain head is missing", hint="run `dn db init`", where="database")
        e = Entry(seq=head["seq"] + 1, at=head["now"], actor=actor, actor_key=actor_key, command=command,
                  args=clean_args(args), tenant=tenant, host=host, outcome=outcome, exit_code=int(exit_code),
                  request_id=request_id, pid=os.getpid(), machine=socket.gethostname(), prev_hash=head["hash"])
        e = Entry(**{**e.__dict__, "hash": e.compute_hash()})
        values = [getattr(e, c) for c in _COLUMNS]
        values[_COLUMNS.index("args")] = db.jsonb(e.args)
        conn.execute(f"INSERT INTO audit_log ({', '.join(_COLUMNS)}) VALUES ({', '.join(['%s'] * len(_COLUMNS))})",
                     values)
    return e


def record(ctx: "Context", command: str, args: Mapping[str, Any], *, tenant: str | None = None,
           host: str | None = None, outcome: str = "ok", exit_code: int = 0,
           conn: "Connection | None" = None) -> Entry:
    """Append one entry for ``ctx``'s actor (opens a connection unless given one)."""
    from dn import db

    settings = ctx.settings
    own = conn is None
    conn = conn or db.connect(settings.database, application_name=f"dn audit {ctx.request_id}")
    try:
        e = append(conn, actor=ctx.actor, actor_key=operator_key_fingerprint(settings, host), command=command,
                   args=args, tenant=tenant, host=host, outcome=outcome, exit_code=exit_code,
                   request_id=ctx.request_id)
    finally:
        if own:
            conn.close()
    try:
        _record_witness(settings, e.seq, e.hash)
    except OSError as err:
        ctx.err.print(f"[yellow]warning:[/] could not update the audit witness file: {err.strerror}", soft_wrap=True)
    return e


@dataclass
class Operation:
    """What a privileged body sees: it may add results to ``args`` (redacted when written)."""

    command: str
    args: dict[str, Any]
    tenant: str | None
    host: str | None
    request_id: str
    resources: list[str]
    entry: Entry | None = None


def outcome_of(e: BaseException) -> tuple[str, int]:
    """The (outcome, exit code) an entry records for an exception ending an operation."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(e, DnError):
        return "failed", int(e.exit_code)
    if isinstance(e, SystemExit):
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return ("ok" if code == 0 else "failed"), code
    code = getattr(e, "exit_code", None)  # click/typer Exit
    if isinstance(code, int):
        return ("ok" if code == 0 else "failed"), code
    name = type(e).__name__
    if name == "Abort":  # click.Abort: the user interrupted a prompt
        return "interrupted", 130
    return "failed", 1


def _resources(lock: bool | Sequence[str], tenant: str | None, host: str | None) -> list[str]:
    from dn import locks

    if lock is True:
        out = []
        if tenant:
            out.append(locks.resource("tenant", tenant))
        if host:
            out.append(locks.resource("host", host))
        return out
    if not lock:
        return []
    return [locks.parse_resource(r, field="lock") for r in lock]


@contextlib.contextmanager
def privileged(ctx: "Context", command: str, args: Mapping[str, Any], *, tenant: str | None = None,
               host: str | None = None, lock: bool | Sequence[str] = True) -> Iterator[Operation]:
    """Run a privileged operation: lock, run the body, append exactly one audit entry, unlock.

    ``lock=True`` locks ``tenant:<tenant>`` and ``host:<host>`` (those given); ``lock=False``
    locks nothing; a list names the resources to lock. The entry records ``ok``, ``failed`` with
    the exit code of the error, or ``interrupted`` (Ctrl-C); a lock that cannot be had is
    recorded as failed with exit code 5. When the database cannot be reached nothing runs.
    """
    from dn import db, locks

    settings = ctx.settings
    resources = _resources(lock, tenant, host)
    op = Operation(command, dict(args), tenant, host, ctx.request_id, resources)
    conn = db.connect(settings.database, application_name=f"dn {command} {ctx.request_id}")
    held: list[str] = []
    outcome, code, failure = "ok", 0, None
    try:
        if resources:
            claimant = locks.Claimant.this_process(ctx.actor, command, ctx.request_id)
            held = locks.acquire(conn, resources, claimant, settings.database.lock_timeout,
                                 stale_after=settings.database.lock_stale_after,
                                 on_takeover=lambda h, why: record_takeover(ctx, h.resource, h.to_dict(), why,
                                                                            command, conn=conn))
        yield op
    except BaseException as e:
        outcome, code = outcome_of(e)
        failure = e
        raise
    finally:
        _finish(ctx, conn, op, outcome, code, held, failure)


def record_takeover(ctx: "Context", resource: str, holder: Mapping[str, Any], why: str, by_command: str, *,
                    tenant: str | None = None, host: str | None = None, conn: "Connection | None" = None) -> Entry:
    """The audit entry of a lock taken over from a provably dead holder (dn.locks, dn.engine):
    which lock, whose it was, why that holder is dead, and which command took it."""
    kind, _, name = resource.partition(":")
    tenant = tenant if tenant is not None else (name if kind == "tenant" else None)
    host = host if host is not None else (name if kind == "host" else None)
    keep = ("actor", "command", "request_id", "pid", "machine", "since", "username", "hostname", "timestamp", "path")
    return record(ctx, "lock takeover", {"resource": resource, "holder": {k: v for k, v in holder.items() if k in keep},
                                         "reason": why, "taken_by": by_command}, tenant=tenant, host=host, conn=conn)


def _finish(ctx: "Context", conn: "Connection", op: Operation, outcome: str, code: int, held: list[str],
            failure: BaseException | None) -> None:
    from dn import db, locks

    settings = ctx.settings
    write_error: DnError | None = None
    fresh = None
    try:
        target = conn
        if conn.closed or conn.broken:
            # The session (and with it our advisory locks) is gone: write on a new connection and
            # remove our lock rows there, so they do not look like a crashed run's.
            fresh = target = db.connect(settings.database, application_name=f"dn {op.command} {ctx.request_id}")
        op.entry = record(ctx, op.command, op.args, tenant=op.tenant, host=op.host, outcome=outcome,
                          exit_code=code, conn=target)
    except DnError as e:
        write_error = e
    try:
        if fresh is not None:
            locks.forget(fresh, ctx.request_id)
        elif held and not conn.closed:
            locks.release(conn, held, ctx.request_id)
    except DnError as e:
        ctx.err.print(f"[yellow]warning:[/] releasing {', '.join(held)}: {e} (see `dn lock list`)", soft_wrap=True)
    finally:
        conn.close()
        if fresh is not None:
            fresh.close()
    if write_error is not None:
        if failure is None:
            raise OperationFailed(f"'{op.command}' completed but its audit entry could not be written: "
                                  f"{write_error.message}", hint=write_error.hint or "check the database",
                                  where="audit") from None
        ctx.err.print(f"[yellow]warning:[/] '{op.command}' was not audited: {write_error.message}", soft_wrap=True)


# -- reading, verifying, pruning -----------------------------------------------------------------
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM audit_log"


def show(ctx: "Context", since: datetime | None = None, tenant: str | None = None,
         limit: int | None = None) -> list[Entry]:
    """Entries at or after ``since`` (and for ``tenant``), oldest first; ``limit`` keeps the newest."""
    from dn import db

    where, params = [], []
    if since is not None:
        where.append("at >= %s")
        params.append(since)
    if tenant is not None:
        where.append("tenant = %s")
        params.append(tenant)
    query = _SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq DESC"
    if limit is not None:
        query += " LIMIT %s"
        params.append(limit)
    with db.connect(ctx.settings.database, application_name="dn audit show") as conn, \
            db.translate_errors("reading the audit log"):
        found = [Entry.from_row(r) for r in db.rows(conn, query, params)]
    return found[::-1]


def _snapshot(conn: "Connection") -> tuple[list[Entry], tuple[int, str] | None, list[Anchor]]:
    """Entries, head and anchors from one consistent snapshot."""
    from dn import db

    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    try:
        entries = [Entry.from_row(r) for r in db.rows(conn, _SELECT + " ORDER BY seq")]
        h = db.row(conn, "SELECT seq, hash FROM audit_head")
        anchors = [Anchor.from_row(r) for r in db.rows(
            conn, "SELECT anchor_seq, anchor_hash, anchor_at, pruned_from, pruned_count, signed_at, public_key,"
                  " signature FROM audit_anchor ORDER BY anchor_seq")]
    finally:
        conn.execute("COMMIT")
    return entries, ((h["seq"], h["hash"]) if h else None), anchors


def read_region_witness(store: "Store", trusted: set[str]) -> tuple[SignedWitness | None, list[Problem]]:
    """The newest binding witness in the second region signed by a pinned key, and a problem for
    every newer file that is not one (unreadable, misnamed, forged or signed by another key).
    Witnesses of entries that a later restore record says were lost with a restore are skipped."""
    problems: list[Problem] = []
    found = []
    for name in store.records(WITNESS_DIR):
        m = _WITNESS_NAME.match(name)
        if m is None:
            problems.append(Problem("witness", None, f"{WITNESS_DIR}/{name} in the second region is not a witness file"))
        else:
            found.append((int(m.group(2)), bool(m.group(1)), name))

    def load(seq: int, name: str) -> SignedWitness | None:
        where = f"{WITNESS_DIR}/{name} in the second region"
        try:
            w = SignedWitness.from_json(store.read_record(WITNESS_DIR, name))
        except (ValueError, KeyError, TypeError):
            problems.append(Problem("witness", seq, f"{where} is unreadable"))
            return None
        if w.name != name or not w.signature_valid():
            problems.append(Problem("witness", seq, f"{where}: signature does not verify (witness forged or altered)"))
        elif w.public_key not in trusted:
            problems.append(Problem("witness", seq, f"{where}: signed by {key_fingerprint(w.public_key)}, which is not "
                                                    "a pinned key (audit.anchor_keys)"))
        else:
            return w
        return None

    # Restore records are few: read them all. Witnesses are read newest first, until one binds.
    restores = [w for seq, r, name in found if r for w in [load(seq, name)] if w is not None]
    for seq, is_restore, name in sorted(found, key=lambda f: (f[0], f[1]), reverse=True):
        w = next((r for r in restores if r.name == name), None) if is_restore else load(seq, name)
        if w is not None and not any(r.supersedes(w) for r in restores):
            return w, problems
    return None, problems


def record_region_witness(store: "Store", key, seq: int, hash_: str) -> SignedWitness | None:
    """Add a signed witness of ``seq``/``hash_`` to the second region as a new file (an existing
    one is never replaced); None when that witness is there already."""
    unsigned = SignedWitness(seq, hash_, _ts(datetime.now(timezone.utc)), public_key_b64(key), "")
    w = SignedWitness(**{**unsigned.__dict__, "signature": base64.b64encode(key.sign(unsigned.message())).decode()})
    return w if store.add_record(WITNESS_DIR, w.name, w.to_json()) else None


def _unverified(settings: "Settings") -> list[Problem]:
    """What makes a verification unable to judge, known before any I/O."""
    out = []
    if not settings.audit.anchor_keys:
        out.append(Problem("unverified", None, "audit.anchor_keys is not set: no anchor or witness can be trusted, so "
                                               "a forged prune or a rewritten chain would look intact"))
    if settings.backup is None:
        out.append(Problem("unverified", None, "backup is not configured: the chain's witness is kept in the second "
                                               "region, and without it a deleted or rewritten tail goes unseen"))
    return out


def verify(ctx: "Context", *, use_witness: bool = True, store: "Store | None" = None) -> VerifyResult:
    """Verify the whole chain from the latest anchor (or the start), against the head row, the
    pinned anchor keys, the newest witness in the second region and (unless ``use_witness`` is
    False) this machine's witness file. Fails when keys or region are not configured. A clean
    result moves this machine's witness forward and, where this machine's anchor key is pinned,
    adds a witness to the region. ``store`` is an open second-region store to use."""
    from dn import db

    settings = ctx.settings
    trusted = trusted_anchor_keys(settings)
    unverified = _unverified(settings)
    local = read_witness(settings) if use_witness else None
    region, region_problems = None, []
    own = None
    try:
        if not unverified:
            if store is None:
                from dn.backup.run import open_store

                store = own = open_store(settings)
            # The region first: a witness added after our snapshot could be newer than it.
            region, region_problems = read_region_witness(store, trusted)
        with db.connect(settings.database, application_name="dn audit verify") as conn, \
                db.translate_errors("verifying the audit log"):
            entries, head, anchors = _snapshot(conn)
        result = verify_chain(entries, head=head, anchors=anchors, trusted_keys=trusted, witness=local, region=region)
        result.problems = unverified + region_problems + result.problems
        if not result.ok or result.last_seq <= 0:
            return result
        last_hash = entries[-1].hash if entries else (result.anchor.anchor_hash if result.anchor else GENESIS)
        if use_witness:
            try:
                _record_witness(settings, result.last_seq, last_hash)
            except OSError as err:
                ctx.err.print(f"[yellow]warning:[/] could not update the audit witness file: {err.strerror}",
                              soft_wrap=True)
        key = signing_key(settings)
        if key is not None and store is not None and (region is None or region.seq < result.last_seq):
            result.recorded = record_region_witness(store, key, result.last_seq, last_hash)
        return result
    finally:
        if own is not None:
            own.close()


def accept_restore(ctx: "Context") -> SignedWitness:
    """After a database restore: record in the second region, signed with this machine's pinned
    key, that the chain now ends at its current head and that the entries after it which the
    region's newest witness saw were lost with the restore. Refuses unless that lost tail is the
    only problem; also moves this machine's witness file back to the restored head."""
    from dn import db
    from dn.backup.run import open_store

    settings = ctx.settings
    unverified = _unverified(settings)
    if unverified:
        raise ConfigError("; ".join(p.detail for p in unverified), hint=UNVERIFIED_HINT)
    key = require_signing_key(settings)
    trusted = trusted_anchor_keys(settings)
    with open_store(settings) as store:
        region, region_problems = read_region_witness(store, trusted)
        with db.connect(settings.database, application_name="dn audit accept-restore") as conn, \
                db.translate_errors("reading the audit log"):
            entries, head, anchors = _snapshot(conn)
        result = verify_chain(entries, head=head, anchors=anchors, trusted_keys=trusted, region=region)
        if region is None or region.seq <= result.last_seq:
            raise OperationFailed(f"nothing was lost: the second region's newest witness is "
                                  f"#{region.seq if region else 0}, the chain reaches #{result.last_seq}",
                                  hint="run `dn audit verify`", where="audit")
        others = [p for p in region_problems + result.problems if (p.kind, p.seq) != ("witness", region.seq)]
        if others:
            raise PolicyViolation(f"refusing to accept the restore: the chain has other problems "
                                  f"({len(others)}, first: {others[0]})", hint="run `dn audit verify`",
                                  runbook="incident-response#detection", where="audit")
        last_hash = entries[-1].hash if entries else (result.anchor.anchor_hash if result.anchor else GENESIS)
        unsigned = SignedWitness(result.last_seq, last_hash, _ts(datetime.now(timezone.utc)), public_key_b64(key), "",
                                 region.seq, region.hash)
        record = SignedWitness(**{**unsigned.__dict__,
                                  "signature": base64.b64encode(key.sign(unsigned.message())).decode()})
        store.add_record(WITNESS_DIR, record.name, record.to_json())
    p = witness_path(settings)
    _private_dir(p.parent)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"seq": record.seq, "hash": record.hash, "seen_at": record.witnessed_at}) + "\n")
    os.replace(tmp, p)
    return record


def require_signing_key(settings: "Settings"):
    """This machine's anchor key, which must be pinned in ``audit.anchor_keys`` (checked before
    any I/O: an anchor signed by an unpinned key would not verify anywhere)."""
    key = signing_key(settings)
    if key is None:
        own = anchor_key(settings, create=False)
        which = key_fingerprint(public_key_b64(own)) if own is not None else "none made yet"
        raise ConfigError(f"audit.anchor_keys does not pin this machine's anchor key ({which}): "
                          "its anchors would not verify", hint=_KEYS_HINT)
    return key


@dataclass
class PruneResult:
    cutoff: datetime
    older_than_days: int
    first_seq: int | None
    last_seq: int | None
    count: int
    dry_run: bool
    anchor: Anchor | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"cutoff": _ts(self.cutoff), "older_than_days": self.older_than_days, "first_seq": self.first_seq,
                "last_seq": self.last_seq, "count": self.count, "dry_run": self.dry_run,
                "anchor": self.anchor.to_dict() if self.anchor else None}


def prune(ctx: "Context", older_than_days: int | None = None, *, dry_run: bool = False) -> PruneResult:
    """Remove entries older than ``older_than_days`` (default and floor ``retention.audit_days``)
    after writing an anchor signed by this machine's pinned key. Refuses when the chain does not
    verify: pruning would erase evidence."""
    from dn import db

    settings = ctx.settings
    floor = settings.retention.audit_days
    days = floor if older_than_days is None else older_than_days
    if days < floor:
        raise InvalidInput("older_than_days", f"must be at least retention.audit_days ({floor}): "
                                              "the database refuses younger entries")
    key = None if dry_run else require_signing_key(settings)
    check = verify(ctx)
    if not check.ok:
        raise PolicyViolation(f"refusing to prune: the audit log does not verify ({len(check.problems)} problems, "
                              f"first: {check.problems[0]})", hint="run `dn audit verify` and treat it as an incident",
                              runbook="incident-response#detection", where="audit")
    with db.connect(settings.database, application_name=f"dn audit prune {ctx.request_id}") as conn, \
            db.translate_errors("pruning the audit log"), conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (CHAIN_LOCK,))
        # The transaction's time: audit_prune() dates the anchor with it, whatever we say.
        now = conn.execute("SELECT now()").fetchone()[0]
        cutoff = now - timedelta(days=days)
        # Entry times never go backwards (the append trigger), so old entries form a prefix.
        span = db.row(conn, "SELECT min(seq) AS first, max(seq) AS last, count(*) AS n FROM audit_log WHERE at < %s",
                      (cutoff,))
        assert span is not None
        result = PruneResult(cutoff, days, span["first"], span["last"], span["n"], dry_run)
        if not span["n"] or dry_run:
            return result
        last = db.row(conn, "SELECT hash, at FROM audit_log WHERE seq = %s", (span["last"],))
        assert last is not None
        assert key is not None
        unsigned = Anchor(span["last"], last["hash"], last["at"], span["first"], span["n"], now,
                          public_key_b64(key), "")
        anchor = Anchor(**{**unsigned.__dict__,
                           "signature": base64.b64encode(key.sign(unsigned.message())).decode()})
        conn.execute("SELECT audit_prune(%s, %s, %s, %s, %s, %s)",
                     (anchor.anchor_seq, anchor.anchor_hash, anchor.pruned_from, anchor.pruned_count,
                      anchor.public_key, anchor.signature))
        result.anchor = anchor
    return result
