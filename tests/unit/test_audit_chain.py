"""The audit log's pure core: redaction, canonical hashing, chain verification, anchors, --since."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from dn import audit
from dn.audit import GENESIS, Anchor, Entry, Witness, verify_chain
from dn.errors import InvalidInput

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)

# -- redaction -----------------------------------------------------------------------------------
R, P = audit.REDACTED, audit.PERSONAL


@pytest.mark.parametrize("key, value, expected", [
    # secret keys: the whole value goes
    ("passphrase", "correct horse battery staple", R),
    ("password", "hunter2", R),
    ("PGPASSWORD", "hunter2", R),
    ("db_password", "x", R),
    ("secret", "s", R),
    ("client_secret", "s", R),
    ("token", "abc", R),
    ("github_token", "abc", R),
    ("key", "k", R),
    ("api_key", "k", R),
    ("apiKey", "k", R),
    ("ssh-key", "k", R),
    ("private_key", "-----BEGIN...", R),
    ("container_config", "aWQ9R1RNLVhYWFgmZW52PTE=", R),
    ("containerConfig", "aWQ9", R),
    ("session", "abc", R),
    ("session_id", "abc", R),          # a session id is a bearer credential
    ("cookie", "sid=1", R),
    ("authorization", "Basic dXNlcjpwdw==", R),
    ("fernet_keys", ["a", "b"], R),
    ("secrets", {"a": 1}, R),
    # names of or pointers to secrets stay readable
    ("key_id", "k_12345678", "k_12345678"),
    ("key_path", "/root/.ssh/id_ed25519", "/root/.ssh/id_ed25519"),
    ("passphrase_file", "/etc/dn/passphrase", "/etc/dn/passphrase"),
    ("passphrase_env", "DN_PASSPHRASE", "DN_PASSPHRASE"),
    ("key_fingerprint", "SHA256:abc", "SHA256:abc"),
    # not secret words at all
    ("keyboard", "qwerty", "qwerty"),
    ("monkey", "banana", "banana"),
    ("tenant", "acme", "acme"),
    ("host", "eu1", "eu1"),
    ("author", "jan", "jan"),
    # empty values stay empty (useful: "no passphrase given")
    ("password", "", ""),
    ("token", None, None),
    # personal data keys
    ("email", "jana@acme.example", P),
    ("client_ip", "192.0.2.1", P),
    ("user_agent", "Mozilla/5.0", P),
    ("cookie_id", "GA1.2.3", P),         # an end user's cookie id is personal data
    ("billing_address", "Praha 1", P),
    ("fullName", "Jana Nováková", P),
    ("display_name", "Jana Nováková", P),  # a sole trader's tenant is named after her
])
def test_redact_by_key(key, value, expected):
    assert audit.redact({key: value}) == {key: expected}


FERNET = "gAAAAABmZ3J5c2VjcmV0LXRva2VuLXZhbHVlLXRoYXQtaXMtbG9uZy1lbm91Z2gtdG8tbWF0Y2g="
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"


@pytest.mark.parametrize("value, expected", [
    # whole values that look like credentials, under any key
    (FERNET, R),
    (JWT, R),
    ("AKIAIOSFODNN7EXAMPLE", R),
    ("ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8", R),
    ("xoxb-123456789012-abcdefghij", R),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE=\n-----END OPENSSH PRIVATE KEY-----", R),
    ("Zx9kQ2mL7pR4tV8wY1aB3cD5eF6gH0jK", R),             # random token (mixed case + digits)
    ("kJ3nX8wQ2pL5vR9tY7uB1cD4fG6hM0sA_-Zq", R),
    (base64.urlsafe_b64encode(bytes(range(32))).decode(), R),  # a Fernet key
    # identifiers that are not secrets stay
    ("3f7a9c2e4b6d8f0a1c3e5b7d9f1a3c5e7b9d1f3a5c7e9b1d3f5a7c9e1b3d5f7a", "3f7a9c2e4b6d8f0a1c3e5b7d9f1a3c5e7b9d1f3a5c7e9b1d3f5a7c9e1b3d5f7a"),
    ("550e8400-e29b-41d4-a716-446655440000", "550e8400-e29b-41d4-a716-446655440000"),
    ("/srv/dn-sandbox/eu1/etc/nginx/conf.d", "/srv/dn-sandbox/eu1/etc/nginx/conf.d"),
    ("gcr.io/cloud-tagging-10302018/gtm-cloud-image:stable", "gcr.io/cloud-tagging-10302018/gtm-cloud-image:stable"),
    ("tenant create acme --plan standard", "tenant create acme --plan standard"),
    ("SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s", "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s"),
    # parts of longer strings
    ("postgresql://dn:hunter2@db.internal:5432/dn", f"postgresql://dn:{R}@db.internal:5432/dn"),
    ("https://user:pa55@example.org/x", f"https://user:{R}@example.org/x"),
    ("PGPASSWORD=hunter2 pg_dump dn", f"PGPASSWORD={R} pg_dump dn"),
    ("--password 'x' api_key: abc123", f"--password 'x' api_key: {R}"),
    ("Authorization: Bearer abcdefgh12345678", f"Authorization: Bearer {R}"),
    ("deletion request from jana@acme.example for acme", "deletion request from [email redacted] for acme"),
    (123, 123),
    (True, True),
    (None, None),
])
def test_redact_by_value(value, expected):
    assert audit.redact({"note": value}) == {"note": expected}
    assert audit.redact([value]) == [expected]


def test_redact_nested_and_leaves_input_untouched():
    args = {"tenant": "acme", "spec": {"plan": "standard", "sgtm": {"container_config": "aWQ9"}},
            "users": [{"email": "a@b.example", "role": "owner"}], "secrets": {"x": "y"}}
    before = json.dumps(args, sort_keys=True)
    assert audit.redact(args) == {"tenant": "acme", "spec": {"plan": "standard", "sgtm": {"container_config": R}},
                                  "users": [{"email": P, "role": "owner"}], "secrets": R}
    assert json.dumps(args, sort_keys=True) == before


def test_normalize_makes_jsonb_stable_data():
    class Plan:
        def __str__(self):
            return "standard"

    out = audit.normalize({"n": 1, "f": 1e300, "b": b"\x00secret", "p": Path("/x"), "t": (1, 2), "s": {"b", "a"},
                           "o": Plan(), "z": "a\x00b", 3: "int key", "long": "x" * 2000, "bad": "\udcff"})
    assert out["f"] == "1e+300" and out["b"] == "[7 bytes]" and out["p"] == "/x" and out["t"] == [1, 2]
    assert out["s"] == ["a", "b"] and out["o"] == "standard" and out["z"] == "ab" and out["3"] == "int key"
    assert out["long"].endswith("[truncated]") and len(out["long"]) < 1100
    assert out["bad"] == "?"
    json.dumps(out, ensure_ascii=False).encode("utf-8")  # encodable as UTF-8 (jsonb accepts it)


# -- chains --------------------------------------------------------------------------------------
def chain(n: int, start: int = 1, prev: str = GENESIS, t0: datetime = T0) -> list[Entry]:
    out = []
    for i in range(start, start + n):
        e = Entry(seq=i, at=t0 + timedelta(minutes=i), actor="user:root", actor_key="SHA256:abc", command="tenant update",
                  args={"tenant": "acme", "n": i}, tenant="acme", host="eu1", outcome="ok", exit_code=0,
                  request_id=f"req{i}", pid=100 + i, machine="ops", prev_hash=prev)
        e = replace(e, hash=e.compute_hash())
        out.append(e)
        prev = e.hash
    return out


def head_of(entries):
    return (entries[-1].seq, entries[-1].hash)


def rechain(entries: list[Entry], prev: str = GENESIS) -> list[Entry]:
    """Re-link and re-hash entries from ``prev`` (what someone rewriting the table does)."""
    out = []
    for e in entries:
        e = replace(e, prev_hash=prev)
        e = replace(e, hash=e.compute_hash())
        out.append(e)
        prev = e.hash
    return out


def rehash(e: Entry) -> Entry:
    return replace(e, hash=e.compute_hash())


def kinds(result):
    return sorted((p.kind, p.seq) for p in result.problems)


def test_intact_chain_verifies():
    c = chain(5)
    r = verify_chain(c, head=head_of(c))
    assert r.ok and r.checked == 5 and r.first_seq == 1 and r.last_seq == 5 and r.problems == []


def test_empty_chain_verifies():
    r = verify_chain([], head=(0, GENESIS))
    assert r.ok and r.last_seq == 0


def test_hash_covers_every_field():
    e = chain(1)[0]
    for f in audit.HASHED_FIELDS:
        v = getattr(e, f)
        changed = {"at": e.at + timedelta(microseconds=1), "args": {**e.args, "n": 2}}.get(f)
        if changed is None:
            changed = (v + 1) if isinstance(v, int) else ((v or "") + "x")
        assert replace(e, **{f: changed}).compute_hash() != e.hash, f


def test_canonical_encoding_is_independent_of_key_order_and_zone():
    e = chain(1)[0]
    e2 = replace(e, args=dict(reversed(list(e.args.items()))), at=e.at.astimezone(timezone(timedelta(hours=2))))
    assert e2.compute_hash() == e.hash


@pytest.mark.parametrize("attack, expected", [
    ("modify", [("modified", 3)]),
    ("modify-and-rehash", [("broken-link", 4)]),
    ("delete", [("missing", 3)]),
    ("delete-tail", [("missing", 5)]),
    ("insert-forged-tail", [("inserted", 6)]),
    ("insert-garbage-tail", [("inserted", 6), ("modified", 6)]),
    ("swap-seq", [("broken-link", 2), ("broken-link", 3), ("broken-link", 4), ("modified", 2), ("modified", 3),
                  ("out-of-order", 3)]),
    ("swap-content", [("modified", 2), ("modified", 3), ("out-of-order", 3)]),
    ("backdate", [("modified", 4), ("out-of-order", 4)]),
])
def test_tampering_is_named(attack, expected):
    c = chain(5)
    head = head_of(c)
    if attack == "modify":
        c[2] = replace(c[2], outcome="failed")
    elif attack == "modify-and-rehash":
        c[2] = rehash(replace(c[2], actor="user:someone-else"))
    elif attack == "delete":
        del c[2]
    elif attack == "delete-tail":
        c = c[:4]
    elif attack == "insert-forged-tail":
        c.append(rehash(replace(c[-1], seq=6, prev_hash=c[-1].hash, command="forged")))
    elif attack == "insert-garbage-tail":
        c.append(replace(c[-1], seq=6, prev_hash=c[-1].hash, command="forged", hash="f" * 64))
    elif attack == "swap-seq":
        c[1], c[2] = replace(c[2], seq=2), replace(c[1], seq=3)
    elif attack == "swap-content":
        keep = ("seq", "prev_hash", "hash")
        a = {f: getattr(c[2], f) for f in Entry.__dataclass_fields__ if f not in keep}
        b = {f: getattr(c[1], f) for f in Entry.__dataclass_fields__ if f not in keep}
        c[1], c[2] = replace(c[1], **a), replace(c[2], **b)
    elif attack == "backdate":
        c[3] = replace(c[3], at=c[0].at - timedelta(days=100))
    assert kinds(verify_chain(c, head=head)) == expected


def test_deleted_tail_with_edited_head_is_caught_by_the_witness():
    c = chain(5)
    w = Witness(5, c[4].hash, "2026-03-01T12:05:00+00:00")
    cut = c[:3]
    r = verify_chain(cut, head=head_of(cut), witness=w)
    assert kinds(r) == [("witness", 5)] and "ends at #3" in r.problems[0].detail


def test_rewritten_history_is_caught_by_the_witness():
    c = chain(5)
    w = Witness(4, c[3].hash, "2026-03-01T12:05:00+00:00")
    # An attacker edits #2 and re-hashes everything after it, head included.
    forged = [c[0]]
    for e in c[1:]:
        forged.append(rehash(replace(e, prev_hash=forged[-1].hash, actor="user:x" if e.seq == 2 else e.actor)))
    assert verify_chain(forged, head=head_of(forged)).ok  # undetectable from the database alone
    r = verify_chain(forged, head=head_of(forged), witness=w)
    assert kinds(r) == [("witness", 4)] and "history rewritten" in r.problems[0].detail


# -- anchors -------------------------------------------------------------------------------------
def signed_anchor(entries, upto: int, key=None, pruned_from: int = 1) -> Anchor:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = key or Ed25519PrivateKey.generate()
    e = next(x for x in entries if x.seq == upto)
    a = Anchor(upto, e.hash, e.at, pruned_from, upto - pruned_from + 1, T0 + timedelta(days=100),
               audit.public_key_b64(key), "")
    return replace(a, signature=base64.b64encode(key.sign(a.message())).decode())


def test_chain_verifies_from_a_signed_anchor():
    c = chain(6)
    a = signed_anchor(c, 3)
    r = verify_chain(c[3:], head=head_of(c), anchors=[a], trusted_keys={a.public_key})
    assert r.ok and r.checked == 3 and r.first_seq == 4 and r.anchor == a


def test_small_order_key_with_zero_signature_is_not_a_valid_anchor():
    # Verifies under OpenSSL's Ed25519 for many messages; a forger needs no key at all to write it.
    c = chain(4)
    zero = Anchor(2, c[1].hash, c[1].at, 1, 2, T0, base64.b64encode(bytes(32)).decode(),
                  base64.b64encode(bytes(64)).decode())
    assert not zero.signature_valid()
    assert kinds(verify_chain(c[2:], head=head_of(c), anchors=[zero])) == [("anchor", 2)]


@pytest.mark.parametrize("forgery", ["signature", "hash", "count-and-range", "other-key"])
def test_forged_anchor_is_caught(forgery):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    c = chain(6)
    ours = Ed25519PrivateKey.generate()
    a = signed_anchor(c, 3, key=ours)
    trusted = {audit.public_key_b64(ours)}
    if forgery == "signature":
        a = replace(a, signature=base64.b64encode(b"\x00" * 64).decode())
    elif forgery == "hash":
        a = replace(a, anchor_hash="0" * 64)
    elif forgery == "count-and-range":
        a = replace(a, pruned_count=2)
    elif forgery == "other-key":  # an attacker deletes entries and signs an anchor with their own key
        a = signed_anchor(c, 3)
    r = verify_chain(c[3:], head=head_of(c), anchors=[a], trusted_keys=trusted)
    assert ("anchor", 3) in kinds(r)
    if forgery == "other-key":
        assert "not a pinned anchor key (audit.anchor_keys)" in str(r.problems[0])


def test_a_valid_anchor_fails_when_no_key_is_pinned():
    # The forgery of the `dn` role: prune under a fresh key. Self-signed is not trusted.
    c = chain(6)
    a = signed_anchor(c, 3)
    assert a.signature_valid()
    for trusted in (None, set()):
        r = verify_chain(c[3:], head=head_of(c), anchors=[a], trusted_keys=trusted)
        assert kinds(r) == [("anchor", 3)] and "no anchor key is pinned (audit.anchor_keys)" in str(r.problems[0])


def _key():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def test_entries_removed_between_anchors_are_missing():
    c, k = chain(9), _key()
    a1 = signed_anchor(c, 3, key=k)
    a2 = signed_anchor(c, 6, key=k, pruned_from=5)  # #4 was removed without an anchor
    r = verify_chain(c[6:], head=head_of(c), anchors=[a1, a2], trusted_keys={a1.public_key})
    assert kinds(r) == [("missing", 4)]


def test_entry_kept_below_the_anchor_is_inserted():
    c = chain(6)
    a = signed_anchor(c, 3)
    r = verify_chain(c[2:], head=head_of(c), anchors=[a], trusted_keys={a.public_key})
    assert kinds(r) == [("inserted", 3)]


# -- the second region's witness -----------------------------------------------------------------
def signed_witness(seq: int, hash_: str, key=None) -> audit.SignedWitness:
    key = key or _key()
    w = audit.SignedWitness(seq, hash_, "2026-03-01T12:00:00.000000+00:00", audit.public_key_b64(key), "")
    return replace(w, signature=base64.b64encode(key.sign(w.message())).decode())


def test_signed_witness_round_trips_and_detects_alteration():
    c = chain(3)
    w = signed_witness(3, c[2].hash)
    assert w.signature_valid() and audit.SignedWitness.from_json(w.to_json()) == w
    assert w.name == f"000000000003-{c[2].hash}.json"
    assert not replace(w, seq=2).signature_valid() and not replace(w, hash="0" * 64).signature_valid()
    assert not replace(w, witnessed_at="2027-01-01T00:00:00.000000+00:00").signature_valid()


@pytest.mark.parametrize("attack, expected", [
    ("refill-rehashed", [("witness", 5)]),        # the whole table replaced by a re-hashed chain
    ("rewrite-tail", [("witness", 5)]),           # the last entries rewritten, head moved along
    ("delete-tail", [("witness", 5)]),            # the last entries deleted, head moved back
    ("refill-shorter", [("witness", 5)]),
])
def test_region_witness_catches_what_the_head_row_cannot(attack, expected):
    c = chain(5)
    w = signed_witness(5, c[-1].hash)
    if attack == "refill-rehashed":
        forged = rechain([replace(e, actor="user:nobody") for e in c])
    elif attack == "rewrite-tail":
        forged = rechain(c[:3] + [replace(e, command="nothing to see") for e in c[3:]])
    elif attack == "delete-tail":
        forged = c[:3]
    else:
        forged = rechain([replace(e, actor="user:nobody") for e in c[:4]])
    assert verify_chain(forged, head=head_of(forged)).ok  # the database alone is self-consistent
    r = verify_chain(forged, head=head_of(forged), region=w)
    assert kinds(r) == expected and "the second region's witness" in r.problems[0].detail
    assert verify_chain(c, head=head_of(c), region=w).ok


def test_region_witness_of_the_anchor_itself():
    c, k = chain(6), _key()
    a = signed_anchor(c, 3, key=k)
    ok = verify_chain(c[3:], head=head_of(c), anchors=[a], trusted_keys={a.public_key},
                      region=signed_witness(3, a.anchor_hash))
    assert ok.ok
    bad = verify_chain(c[3:], head=head_of(c), anchors=[a], trusted_keys={a.public_key},
                       region=signed_witness(3, "1" * 64))
    assert kinds(bad) == [("witness", 3)]


# -- --since -------------------------------------------------------------------------------------
NOW = datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("text, expected", [
    ("7d", NOW - timedelta(days=7)),
    ("12h", NOW - timedelta(hours=12)),
    ("90m", NOW - timedelta(minutes=90)),
    ("2w", NOW - timedelta(weeks=2)),
    ("2026-01-31", datetime(2026, 1, 31, tzinfo=timezone.utc)),
    ("2026-01-31T12:00Z", datetime(2026, 1, 31, 12, tzinfo=timezone.utc)),
    ("2026-01-31T12:00:00+01:00", datetime(2026, 1, 31, 11, tzinfo=timezone.utc)),
])
def test_parse_since(text, expected):
    assert audit.parse_since(text, NOW) == expected


@pytest.mark.parametrize("text", ["yesterday", "7", "7y", "-3d", "2026-13-01", ""])
def test_parse_since_rejects(text):
    with pytest.raises(InvalidInput) as ei:
        audit.parse_since(text, NOW)
    assert ei.value.field == "--since" and "duration" in ei.value.rule


# -- operator key fingerprint --------------------------------------------------------------------
def test_operator_key_fingerprint_matches_ssh_keygen(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from dn.config import Settings

    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    kp = tmp_path / "id_ed25519"
    (tmp_path / "id_ed25519.pub").write_text(pub + " founder@laptop\n")
    s = Settings.model_validate({"data_dir": str(tmp_path), "default_host": "eu1", "hosts": {"eu1": {
        "address": "127.0.0.1", "key_path": str(kp), "host_key": pub}}})
    fp = audit.operator_key_fingerprint(s)
    assert fp and fp.startswith("SHA256:")
    if shutil.which("ssh-keygen"):
        out = subprocess.run(["ssh-keygen", "-l", "-f", str(tmp_path / "id_ed25519.pub")], capture_output=True,
                             text=True, check=True).stdout
        assert out.split()[1] == fp
    (tmp_path / "id_ed25519.pub").unlink()
    assert audit.operator_key_fingerprint(s) is None


# -- the pinned keys in the configuration ---------------------------------------------------------
def test_anchor_keys_are_validated_and_pinned_only_from_the_configuration(tmp_path):
    from dn.config import Settings, load_settings
    from dn.errors import ConfigError

    key = _key()
    line = audit.pinned_key(audit.public_key_b64(key))
    s = Settings.model_validate({"data_dir": str(tmp_path), "audit": {"anchor_keys": [line]}})
    assert audit.trusted_anchor_keys(s) == {audit.public_key_b64(key)}
    # This machine's own key file is no anchor of trust unless the configuration pins it.
    bare = Settings.model_validate({"data_dir": str(tmp_path)})
    audit.anchor_key(bare)
    assert audit.trusted_anchor_keys(bare) == set() and audit.signing_key(bare) is None
    cfg = tmp_path / "dn.toml"
    cfg.write_text(f'data_dir = "{tmp_path}"\n[audit]\nanchor_keys = ["ssh-ed25519 AAAA"]\n')
    with pytest.raises(ConfigError, match=r"dn.toml: audit\.anchor_keys: Value error, 'ssh-ed25519 AAAA' must be \"ed25519:"):
        load_settings(cfg, environ={})


def test_retention_below_the_promised_90_days_is_refused(tmp_path):
    from dn.config import Settings
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="audit_days"):
        Settings.model_validate({"data_dir": str(tmp_path), "retention": {"audit_days": 60}})
