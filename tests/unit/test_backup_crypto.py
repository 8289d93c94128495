"""Streaming authenticated encryption: round trips, and every way a damaged artifact must fail."""
import hashlib
import io
import os
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dn.backup import crypto
from dn.backup.crypto import HEADER, MIN_CHUNK, TAG_SIZE, IntegrityError, MissingKey, WrongKey

KEY = bytes(range(32))
KID = b"k" * 16
CTX = b"20250101T000000Z-abc123/platform.dump"


def encrypt(data: bytes, chunk=MIN_CHUNK, key=KEY, kid=KID, ctx=CTX):
    out = io.BytesIO()
    stats = crypto.encrypt_stream(io.BytesIO(data).read, out.write, key, kid, context=ctx, chunk_size=chunk)
    return out.getvalue(), stats


def decrypt(blob: bytes, keys=None, ctx=CTX):
    out = io.BytesIO()
    keys = {KID: KEY} if keys is None else keys
    stats = crypto.decrypt_stream(io.BytesIO(blob).read, out.write, keys.get, context=ctx, name="platform.dump")
    return out.getvalue(), stats


@pytest.mark.parametrize("size", [0, 1, MIN_CHUNK - 1, MIN_CHUNK, MIN_CHUNK + 1, 3 * MIN_CHUNK, 3 * MIN_CHUNK + 17])
def test_round_trip_and_stats(size):
    data = os.urandom(size)
    blob, enc = encrypt(data)
    plain, dec = decrypt(blob)
    assert plain == data
    assert enc == dec
    assert enc.plain_size == size and enc.plain_sha256 == hashlib.sha256(data).hexdigest()
    assert enc.cipher_size == len(blob) and enc.cipher_sha256 == hashlib.sha256(blob).hexdigest()
    # one tag per chunk; the last chunk is always short (possibly empty)
    chunks = size // MIN_CHUNK + 1
    assert len(blob) == HEADER.size + size + chunks * TAG_SIZE


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=5 * MIN_CHUNK), st.lists(st.integers(1, 3 * MIN_CHUNK), max_size=8))
def test_round_trip_whatever_the_write_sizes(data, cuts):
    out = io.BytesIO()
    enc = crypto.Encryptor(KEY, KID, out.write, context=CTX, chunk_size=MIN_CHUNK)
    pos = 0
    for c in cuts:
        enc.write(data[pos : pos + c])
        pos += c
    enc.write(data[pos:])
    enc.close()
    assert decrypt(out.getvalue())[0] == data


def test_same_plaintext_encrypts_differently_each_time():
    a, _ = encrypt(b"x" * 10000)
    b, _ = encrypt(b"x" * 10000)
    assert a != b  # fresh salt and nonce prefix per file


@pytest.mark.parametrize("cut", ["header", "mid-first-chunk", "chunk-boundary", "inside-tag", "last-byte"])
def test_truncation_anywhere_is_detected(cut):
    blob, _ = encrypt(os.urandom(3 * MIN_CHUNK + 100))
    step = MIN_CHUNK + TAG_SIZE
    at = {
        "header": HEADER.size - 5,
        "mid-first-chunk": HEADER.size + 100,
        "chunk-boundary": HEADER.size + 2 * step,  # whole chunks only: no final chunk
        "inside-tag": HEADER.size + step - 3,
        "last-byte": len(blob) - 1,
    }[cut]
    with pytest.raises(IntegrityError, match="artifact platform.dump: (truncated|authentication failed)"):
        decrypt(blob[:at])


def test_bit_flip_in_every_region_is_detected():
    blob, _ = encrypt(os.urandom(2 * MIN_CHUNK + 5))
    for pos in (3, 20, 30, HEADER.size - 1, HEADER.size + 7, HEADER.size + MIN_CHUNK + 2, len(blob) - 1):
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        with pytest.raises((IntegrityError, MissingKey, WrongKey)) as ei:
            decrypt(bytes(bad))
        assert "platform.dump" in str(ei.value)


def test_swapped_chunks_and_appended_bytes_are_detected():
    blob, _ = encrypt(os.urandom(3 * MIN_CHUNK + 10))
    h, step = HEADER.size, MIN_CHUNK + TAG_SIZE
    c0, c1 = blob[h : h + step], blob[h + step : h + 2 * step]
    swapped = blob[:h] + c1 + c0 + blob[h + 2 * step :]
    with pytest.raises(IntegrityError, match="authentication failed at chunk 0"):
        decrypt(swapped)
    with pytest.raises(IntegrityError):
        decrypt(blob + b"\x00")
    # a whole extra block after the final chunk
    with pytest.raises(IntegrityError, match="authentication failed at chunk 3"):
        decrypt(blob + os.urandom(step))
    dropped = blob[:h] + blob[h + step :]
    with pytest.raises(IntegrityError):
        decrypt(dropped)


def test_artifact_is_bound_to_its_context():
    blob, _ = encrypt(b"tenant rows")
    with pytest.raises(IntegrityError, match="another backup"):
        decrypt(blob, ctx=b"20250102T000000Z-def456/platform.dump")


def test_missing_and_wrong_key_are_told_apart_before_any_plaintext():
    blob, _ = encrypt(b"secret" * 1000)
    with pytest.raises(MissingKey, match=f"key {KID.hex()}, which is not in the keystore"):
        decrypt(blob, keys={})
    with pytest.raises(WrongKey, match="wrong key"):
        decrypt(blob, keys={KID: bytes(32)})


def test_error_messages_never_contain_key_material():
    blob, _ = encrypt(b"abc")
    with pytest.raises(WrongKey) as ei:
        decrypt(blob, keys={KID: b"\xaa" * 32})
    text = str(ei.value) + (ei.value.hint or "")
    assert KEY.hex() not in text and ("aa" * 32) not in text


def test_memory_stays_flat_while_streaming_many_chunks():
    chunk = 1 << 16
    total = 64 << 20

    class Zeros:
        left = total

        def read(self, n):
            n = min(n, self.left)
            self.left -= n
            return bytes(n)

    digest = hashlib.sha256()
    tracemalloc.start()
    try:
        stats = crypto.encrypt_stream(Zeros().read, digest.update, KEY, KID, context=CTX, chunk_size=chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats.plain_size == total
    assert peak < 8 * chunk, f"peak {peak} bytes for a {total}-byte stream"
