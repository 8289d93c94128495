"""Streaming authenticated encryption of backup artifacts.

File format (``dn-backup-enc/1``), all integers big-endian::

    header   magic "DNBKENC1" | key id (16) | chunk size (u32) | salt (16) | nonce prefix (8) | key check (32)
    chunk i  AES-256-GCM(file key, nonce = prefix | u32 i, plaintext_i, ad = header | final flag | context) | tag (16)

- The file key and the key check come from HKDF-SHA256(data key, salt): a fresh key per file, and a
  wrong data key is told apart from a damaged file before any plaintext is produced.
- Every chunk except the last holds exactly ``chunk size`` plaintext bytes; the last holds fewer
  (possibly none) and carries the final flag in its associated data. So a file cut at any byte,
  chunks swapped or dropped, or bytes appended after the end all fail authentication.
- The header is bound into every chunk's associated data, and so is ``context`` (the backup id and
  artifact name), so an artifact cannot be passed off as another backup's.
- Memory stays flat: one chunk in flight, whatever the file size.

Pure: depends on ``cryptography`` and the standard library only.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dn.errors import OperationFailed

MAGIC = b"DNBKENC1"
HEADER = struct.Struct(">8s16sI16s8s32s")
TAG_SIZE = 16
KEY_SIZE = 32
KEY_ID_SIZE = 16
DEFAULT_CHUNK = 1 << 20
MIN_CHUNK = 1 << 12
MAX_CHUNK = 1 << 24
MAX_CHUNKS = 1 << 32  # the counter is 32 bits: at 1 MiB chunks, 4 PiB per file
_FILE_INFO = b"dn-backup-enc/1 file key"


class CryptoError(OperationFailed):
    """An artifact cannot be decrypted; the message names the artifact and why."""


class IntegrityError(CryptoError):
    """The artifact is damaged: truncated, bit-flipped, reordered or not a dn artifact."""


class MissingKey(CryptoError):
    """The key that encrypted the artifact is not in the keystore (destroyed, or another keystore)."""


class WrongKey(CryptoError):
    """A key was supplied, but it is not the one that encrypted the artifact."""


@dataclass(frozen=True)
class StreamStats:
    """Sizes and SHA-256 digests of both sides of one encryption or decryption."""

    plain_size: int
    plain_sha256: str
    cipher_size: int
    cipher_sha256: str


def new_key() -> bytes:
    return os.urandom(KEY_SIZE)


def new_key_id() -> bytes:
    return os.urandom(KEY_ID_SIZE)


def _derive(data_key: bytes, salt: bytes) -> tuple[bytes, bytes]:
    if len(data_key) != KEY_SIZE:
        raise ValueError("data key must be 32 bytes")
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=salt, info=_FILE_INFO).derive(data_key)
    return okm[:32], okm[32:]


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + index.to_bytes(4, "big")


class Encryptor:
    """Push plaintext with :meth:`write`, then :meth:`close`; ciphertext goes to ``sink``.

    ``context`` binds the ciphertext to where it belongs (e.g. ``b"<backup id>/<artifact>"``); the
    same context must be given to decrypt.
    """

    def __init__(
        self,
        data_key: bytes,
        key_id: bytes,
        sink: Callable[[bytes], object],
        *,
        context: bytes,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> None:
        if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk_size must be between {MIN_CHUNK} and {MAX_CHUNK}")
        if len(key_id) != KEY_ID_SIZE:
            raise ValueError("key id must be 16 bytes")
        salt, prefix = os.urandom(16), os.urandom(8)
        file_key, check = _derive(data_key, salt)
        self._aead = AESGCM(file_key)
        self._header = HEADER.pack(MAGIC, key_id, chunk_size, salt, prefix, check)
        self._prefix = prefix
        self._context = context
        self._chunk = chunk_size
        self._sink = sink
        self._buf = bytearray()
        self._index = 0
        self._closed = False
        self._plain = hashlib.sha256()
        self._cipher = hashlib.sha256()
        self._plain_size = 0
        self._cipher_size = 0
        self._emit(self._header)

    def _emit(self, data: bytes) -> None:
        self._cipher.update(data)
        self._cipher_size += len(data)
        self._sink(data)

    def _seal(self, chunk: bytes, final: bool) -> None:
        if self._index >= MAX_CHUNKS:
            raise CryptoError("artifact too large for one encrypted stream (2^32 chunks)")
        ad = self._header + (b"\x01" if final else b"\x00") + self._context
        self._emit(self._aead.encrypt(_nonce(self._prefix, self._index), chunk, ad))
        self._index += 1

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise ValueError("write after close")
        self._plain.update(data)
        self._plain_size += len(data)
        self._buf += data
        cs = self._chunk
        if len(self._buf) >= cs:
            view = memoryview(self._buf)
            full = len(self._buf) - len(self._buf) % cs
            try:
                for off in range(0, full, cs):
                    self._seal(bytes(view[off : off + cs]), final=False)
            finally:
                view.release()
            del self._buf[:full]

    def close(self) -> StreamStats:
        """Seal the final (short, possibly empty) chunk and return the stream's statistics."""
        if not self._closed:
            self._closed = True
            self._seal(bytes(self._buf), final=True)
            self._buf = bytearray()
        return self.stats

    @property
    def stats(self) -> StreamStats:
        return StreamStats(self._plain_size, self._plain.hexdigest(), self._cipher_size, self._cipher.hexdigest())


def _read_exact(read: Callable[[int], bytes], n: int) -> bytes:
    """Read up to ``n`` bytes, looping over short reads (pipes, SFTP); fewer only at end of file."""
    parts, got = [], 0
    while got < n:
        b = read(n - got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def peek_key_id(header: bytes) -> bytes:
    """The key id of an artifact, from its first ``HEADER.size`` bytes."""
    if len(header) < HEADER.size or header[:8] != MAGIC:
        raise IntegrityError("not a dn encrypted artifact (bad header)")
    return HEADER.unpack(header[: HEADER.size])[1]


class Decryptor:
    """Iterate over the plaintext chunks of an encrypted artifact read through ``read``.

    ``lookup(key_id)`` returns the 32-byte data key or None. Raises :class:`IntegrityError` or
    :class:`MissingKey` / :class:`WrongKey` naming ``name``. Plaintext is only yielded chunk by chunk after each chunk
    authenticates; a caller must still treat everything as unverified until iteration ends.
    """

    def __init__(
        self,
        read: Callable[[int], bytes],
        lookup: Callable[[bytes], bytes | None],
        *,
        context: bytes,
        name: str,
    ) -> None:
        self._read = read
        self._lookup = lookup
        self._context = context
        self.name = name
        self._plain = hashlib.sha256()
        self._cipher = hashlib.sha256()
        self._plain_size = 0
        self._cipher_size = 0
        self.key_id: bytes | None = None

    def _take(self, n: int) -> bytes:
        b = _read_exact(self._read, n)
        self._cipher.update(b)
        self._cipher_size += len(b)
        return b

    def _fail(self, why: str) -> IntegrityError:
        return IntegrityError(f"artifact {self.name}: {why}", hint="the backup is damaged; use another backup")

    def __iter__(self):
        header = self._take(HEADER.size)
        if len(header) < HEADER.size:
            raise self._fail(f"truncated: {len(header)} bytes, shorter than the header")
        magic, key_id, cs, salt, prefix, check = HEADER.unpack(header)
        if magic != MAGIC:
            raise self._fail("not a dn encrypted artifact (bad magic)")
        if not MIN_CHUNK <= cs <= MAX_CHUNK:
            raise self._fail(f"corrupted header (chunk size {cs})")
        self.key_id = key_id
        data_key = self._lookup(key_id)
        if data_key is None:
            raise MissingKey(
                f"artifact {self.name}: encrypted with key {key_id.hex()}, which is not in the keystore",
                hint="the key was destroyed (crypto-shredded) or this keystore is not the one that made the backup",
            )
        file_key, expected = _derive(data_key, salt)
        if not hmac.compare_digest(check, expected):
            raise WrongKey(f"artifact {self.name}: key {key_id.hex()} does not match this artifact (wrong key)")
        aead = AESGCM(file_key)
        index = 0
        while True:
            block = self._take(cs + TAG_SIZE)
            final = len(block) < cs + TAG_SIZE
            if len(block) < TAG_SIZE:
                raise self._fail(f"truncated at chunk {index} (byte {self._cipher_size})")
            ad = header + (b"\x01" if final else b"\x00") + self._context
            try:
                plain = aead.decrypt(_nonce(prefix, index), block, ad)
            except InvalidTag:
                raise self._fail(
                    f"authentication failed at chunk {index} (byte offset {self._cipher_size - len(block)}): "
                    "corrupted, truncated, reordered or from another backup"
                ) from None
            self._plain.update(plain)
            self._plain_size += len(plain)
            index += 1
            yield plain
            # A short read means end of file (reads loop until full), so nothing can follow a
            # final chunk; bytes appended to a file make its last chunk fail to authenticate.
            if final:
                return

    @property
    def stats(self) -> StreamStats:
        return StreamStats(self._plain_size, self._plain.hexdigest(), self._cipher_size, self._cipher.hexdigest())


def encrypt_stream(
    read: Callable[[int], bytes],
    sink: Callable[[bytes], object],
    data_key: bytes,
    key_id: bytes,
    *,
    context: bytes,
    chunk_size: int = DEFAULT_CHUNK,
) -> StreamStats:
    """Encrypt everything ``read`` yields until end of file into ``sink``."""
    enc = Encryptor(data_key, key_id, sink, context=context, chunk_size=chunk_size)
    while True:
        b = read(chunk_size)
        if not b:
            return enc.close()
        enc.write(b)


def decrypt_stream(
    read: Callable[[int], bytes],
    sink: Callable[[bytes], object],
    lookup: Callable[[bytes], bytes | None],
    *,
    context: bytes,
    name: str,
) -> StreamStats:
    """Decrypt an artifact into ``sink``; raises before returning if any byte fails to authenticate."""
    dec = Decryptor(read, lookup, context=context, name=name)
    for plain in dec:
        sink(plain)
    return dec.stats
