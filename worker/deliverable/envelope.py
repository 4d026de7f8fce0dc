"""Client-side envelope encryption of stored objects: AES-256-GCM in chunks, flat memory.

Each object gets a fresh 256-bit data key, wrapped (AES-GCM) by the master key from
STORAGE_ENCRYPTION_KEY. Layout of a stored object::

    header = MAGIC (8) | version (1) | master key id (8) | chunk size (4, big-endian)
             | wrap nonce (12) | wrapped data key (32 + 16 tag)
    then chunks: AES-GCM(data key, nonce = chunk number (11 bytes) | last flag (1),
                         plaintext chunk, associated data = header) = chunk + 16-byte tag

The chunk counter and the last-chunk flag in the nonce make a reordered, dropped, or
truncated chunk fail authentication; the header is authenticated by every chunk.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# The master keys are a setting (STORAGE_ENCRYPTION_KEY), parsed and checked by the config.
from worker.config import KeyRing

MAGIC = b"APSISENC"
VERSION = 1
#: Plaintext bytes per encrypted chunk (each adds a 16-byte tag).
CHUNK_BYTES = 64 * 1024
KEY_BYTES = 32
TAG_BYTES = 16
_NONCE_BYTES = 12
_HEAD = struct.Struct(">8sB8sI12s")
HEADER_BYTES = _HEAD.size + KEY_BYTES + TAG_BYTES


class EncryptionError(ValueError):
    """An object cannot be decrypted: wrong key, tampered or truncated."""


def is_encrypted(prefix: bytes) -> bool:
    return prefix.startswith(MAGIC)


def _nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(_NONCE_BYTES - 1, "big") + (b"\x01" if last else b"\x00")


def encrypt_stream(ring: KeyRing, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Encrypt a plaintext stream (any chunking) into the stored form, chunk by chunk."""
    data_key = AESGCM.generate_key(bit_length=256)
    wrap_nonce = os.urandom(_NONCE_BYTES)
    prefix = _HEAD.pack(MAGIC, VERSION, ring.current_id, CHUNK_BYTES, wrap_nonce)
    header = prefix + AESGCM(ring.current).encrypt(wrap_nonce, data_key, prefix)
    yield header
    aead = AESGCM(data_key)
    index = 0
    pending = bytearray()
    held: bytes | None = None  # one full chunk held back: only the last gets the flag
    for piece in chunks:
        pending += piece
        while len(pending) >= CHUNK_BYTES:
            if held is not None:
                yield aead.encrypt(_nonce(index, False), held, header)
                index += 1
            held = bytes(pending[:CHUNK_BYTES])
            del pending[:CHUNK_BYTES]
    if held is not None and pending:
        yield aead.encrypt(_nonce(index, False), held, header)
        index += 1
        held = None
    last = held if held is not None else bytes(pending)
    yield aead.encrypt(_nonce(index, True), last, header)


def encrypt_bytes(ring: KeyRing, data: bytes) -> bytes:
    return b"".join(encrypt_stream(ring, [data]))


def decrypt_stream(ring: KeyRing, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Decrypt the stored form, yielding plaintext chunks; EncryptionError on any tampering."""
    buffer = bytearray()
    source = iter(chunks)
    for piece in source:
        buffer += piece
        if len(buffer) >= HEADER_BYTES:
            break
    if len(buffer) < HEADER_BYTES or not is_encrypted(bytes(buffer[:8])):
        raise EncryptionError("not an encrypted object (or truncated header)")
    magic, version, kid, chunk_bytes, wrap_nonce = _HEAD.unpack_from(buffer)
    del magic
    if version != VERSION:
        raise EncryptionError(f"unknown encryption format version {version}")
    master = ring.keys.get(kid)
    if master is None:
        raise EncryptionError("encrypted with a key not in STORAGE_ENCRYPTION_KEY")
    header = bytes(buffer[:HEADER_BYTES])
    try:
        data_key = AESGCM(master).decrypt(wrap_nonce, header[_HEAD.size :], header[: _HEAD.size])
    except InvalidTag:
        raise EncryptionError("the object's data key does not authenticate") from None
    del buffer[:HEADER_BYTES]
    aead = AESGCM(data_key)
    sealed = chunk_bytes + TAG_BYTES
    index = 0

    def open_chunk(chunk: bytes, last: bool) -> bytes:
        try:
            return aead.decrypt(_nonce(index, last), chunk, header)
        except InvalidTag:
            raise EncryptionError(f"chunk {index} is tampered with or truncated") from None

    for piece in source:
        buffer += piece
        # Keep at least one byte beyond a full chunk: the final chunk is decided at the end.
        while len(buffer) > sealed:
            yield open_chunk(bytes(buffer[:sealed]), False)
            del buffer[:sealed]
            index += 1
    while len(buffer) > sealed:
        yield open_chunk(bytes(buffer[:sealed]), False)
        del buffer[:sealed]
        index += 1
    if len(buffer) < TAG_BYTES:
        raise EncryptionError("the object is truncated")
    yield open_chunk(bytes(buffer), True)
