"""Fernet keys from the environment: parsing, ids, no key ever in an error or repr (pure)."""
from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from dn.errors import ConfigError
from dn.gdpr import keys


def test_keys_parse_newest_first_with_stable_ids():
    k1, k2 = Fernet.generate_key(), Fernet.generate_key()
    ring = keys.parse_keys(f"{k2.decode()}, {k1.decode()}")
    assert ring.keys == (k2, k1)
    assert ring.primary_id == keys.key_id(k2) and ring.ids == [keys.key_id(k2), keys.key_id(k1)]
    assert keys.key_id(k1) == keys.key_id(k1) and keys.key_id(k1).startswith("fk-") and len(keys.key_id(k1)) == 15
    token, kid = ring.encrypt(b"secret")
    assert kid == ring.primary_id and Fernet(k2).decrypt(token.encode()) == b"secret"
    # an old value decrypts through the ring and rotates onto the primary key
    old = Fernet(k1).encrypt(b"old")
    assert Fernet(k2).decrypt(ring.multi().rotate(old)) == b"old"


@pytest.mark.parametrize("raw, message", [
    (None, "DN_FERNET_KEYS is not set"),
    ("  ", "DN_FERNET_KEYS is not set"),
    ("not-a-key", "key 1 is not a Fernet key"),
    (Fernet.generate_key().decode() + ",short", "key 2 is not a Fernet key"),
])
def test_bad_keys_are_named_by_position_never_by_value(raw, message):
    with pytest.raises(ConfigError) as e:
        keys.parse_keys(raw)
    assert message in str(e.value)
    for part in (raw or "").split(","):
        if part.strip():
            assert part.strip() not in str(e.value)


def test_a_repeated_key_is_refused_and_keys_never_show():
    k = Fernet.generate_key().decode()
    with pytest.raises(ConfigError, match="key 2 repeats an earlier key") as e:
        keys.parse_keys(f"{k},{k}")
    assert k not in str(e.value)
    ring = keys.parse_keys(k)
    assert k not in repr(ring) and keys.key_id(k.encode()) in repr(ring)
