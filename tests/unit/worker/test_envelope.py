"""worker/deliverable/envelope.py with Storage: round trip, no plaintext at rest, tampering."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from job_support import make_runtime, run_job

from worker.config import load_settings, parse_key_ring
from worker.deliverable import envelope
from worker.deliverable.storage import Storage
from worker.errors import ConfigError, StorageError
from worker.ops import verify


def _key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@pytest.mark.parametrize("size", [0, 1, envelope.CHUNK_BYTES, 3 * envelope.CHUNK_BYTES + 5])
def test_round_trip_any_size_and_chunking(size: int) -> None:
    ring = parse_key_ring(_key())
    data = os.urandom(size)
    sealed = envelope.encrypt_bytes(ring, data)
    pieces = [sealed[i : i + 1000] for i in range(0, len(sealed), 1000)]
    assert b"".join(envelope.decrypt_stream(ring, pieces)) == data


def test_truncation_reordering_and_the_wrong_key_are_refused() -> None:
    ring = parse_key_ring(_key())
    sealed = envelope.encrypt_bytes(ring, os.urandom(3 * envelope.CHUNK_BYTES + 5))
    sealed_chunk = envelope.CHUNK_BYTES + envelope.TAG_BYTES
    head = envelope.HEADER_BYTES
    dropped_last = sealed[: head + 3 * sealed_chunk]  # the (flagged) last chunk removed
    chunks = [sealed[head + i * sealed_chunk : head + (i + 1) * sealed_chunk] for i in range(3)]
    swapped = sealed[:head] + chunks[1] + chunks[0] + sealed[head + 2 * sealed_chunk :]
    for bad in (dropped_last, swapped, sealed[:-1]):
        with pytest.raises(envelope.EncryptionError):
            b"".join(envelope.decrypt_stream(ring, [bad]))
    with pytest.raises(envelope.EncryptionError, match="not in STORAGE_ENCRYPTION_KEY"):
        b"".join(envelope.decrypt_stream(parse_key_ring(_key()), [sealed]))


def test_a_previous_key_in_the_ring_still_decrypts() -> None:
    old, new = _key(), _key()
    sealed = envelope.encrypt_bytes(parse_key_ring(old), b"hello")
    assert b"".join(envelope.decrypt_stream(parse_key_ring(f"{new},{old}"), [sealed]))


def test_bad_keys_are_one_config_line_without_the_key() -> None:
    with pytest.raises(ConfigError, match="STORAGE_ENCRYPTION_KEY is invalid: key #1 must be 32"):
        load_settings(STORAGE_ENCRYPTION_KEY=base64.b64encode(b"short").decode())
    with pytest.raises(ConfigError, match="not valid base64") as info:
        load_settings(STORAGE_ENCRYPTION_KEY="not*base64")
    assert "not*base64" not in str(info.value)


def test_storage_encrypts_files_and_bytes_and_reads_them_back(tmp_path: Path) -> None:
    ring = parse_key_ring(_key())
    storage = Storage(f"file://{tmp_path}/store", encryption=ring)
    plain = ("Zoë Ångström zoe@example.com " * 200_000).encode()  # ~6 MB, several parts
    source = tmp_path / "p.json"
    source.write_bytes(plain)
    storage.put_file("a/p.json", source)
    storage.put_bytes("a/m.json", b'{"name": "Zo\xc3\xab"}')
    at_rest = (tmp_path / "store/a/p.json").read_bytes()
    assert at_rest.startswith(envelope.MAGIC)
    assert b"zoe@example.com" not in at_rest and "Zoë".encode() not in at_rest
    assert b"Zo" not in (tmp_path / "store/a/m.json").read_bytes()[envelope.HEADER_BYTES :]
    assert storage.get_bytes("a/p.json") == plain
    assert b"".join(storage.iter_bytes("a/m.json")) == '{"name": "Zoë"}'.encode()
    with pytest.raises(StorageError, match="STORAGE_ENCRYPTION_KEY is not set"):
        Storage(f"file://{tmp_path}/store").get_bytes("a/p.json")


def test_an_encrypted_job_verifies_against_plaintext_digests() -> None:
    ring = parse_key_ring(_key())
    rt = make_runtime(Storage("memory:///", encryption=ring))
    run_job(rt, "enc")
    assert verify.verify(rt, "enc").ok
    stored = rt.storage.get_stored_bytes("jobs/enc/profiles/0.json")
    assert b"zoe@example.com" not in stored
    assert b"zoe@example.com" in rt.storage.get_bytes("jobs/enc/profiles/0.json")
