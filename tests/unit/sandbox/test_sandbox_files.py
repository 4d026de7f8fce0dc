"""Tests for sandbox/files.py: valid, deterministic, sized export files, streamed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from sandbox.files import CHUNK_BYTES, digest_export, generate_export, merged_keys


def _file(key: str = "ABC-123", **overrides: Any) -> bytes:
    options: dict[str, Any] = {
        "seed": 0,
        "size": 4096,
        "history": False,
        "definitions": False,
        "merged": False,
        "merged_count": 2,
    }
    options.update(overrides)
    return b"".join(generate_export(key, **options))


def test_plain_file_has_only_the_requested_profile() -> None:
    document = json.loads(_file())
    assert list(document) == ["profiles"]
    assert list(document["profiles"]) == ["ABC-123"]
    sections = document["profiles"]["ABC-123"]["sections"]
    assert 2 <= len(sections) <= 3
    assert all(s.startswith("usercreated.sections.") for s in sections)
    attributes = {a for s in sections.values() for a in s["attributes"]}
    assert "com.apsis1.attributes.email" in attributes
    assert all("history" not in v for s in sections.values() for v in s["attributes"].values())
    events = [e for s in sections.values() for e in s["events"]]
    assert all(e["event_time"].endswith("Z") and "data" in e for e in events)


def test_options_add_history_metadata_and_merged_profiles() -> None:
    document = json.loads(_file(history=True, definitions=True, merged=True, merged_count=3))
    assert list(document["profiles"]) == ["ABC-123", *merged_keys("ABC-123", 0, 3)]
    for profile in document["profiles"].values():
        for section in profile["sections"].values():
            for attribute in section["attributes"].values():
                assert attribute["history"][-1]["value"] == attribute["value"]
    metadata = document["metadata"]["sections"]
    assert set(metadata) == set(document["profiles"]["ABC-123"]["sections"])
    definition = metadata[next(iter(metadata))]["attributes"]
    first = next(iter(definition.values()))
    assert first["versions"] == [{"id": 1, "deprecated_at": None}]


def test_email_derives_from_the_key_and_names_are_utf8() -> None:
    raw = _file("Jane.Doe-42", merged=True)
    text = raw.decode("utf-8")
    assert "jane.doe.42@example.com" in text
    assert any(ord(ch) > 127 for ch in text)


def test_same_arguments_same_bytes_other_key_other_bytes() -> None:
    assert _file(size=100_000) == _file(size=100_000)
    assert _file("X", size=100_000) != _file("Y", size=100_000)
    assert _file(seed=1) != _file(seed=2)


@pytest.mark.parametrize("size", [8192, 10_000, 123_457, 1_000_000])
def test_size_is_exact_above_the_minimal_document(size: int) -> None:
    raw = _file(size=size, history=True, definitions=True, merged=True)
    assert len(raw) == size
    json.loads(raw)


def test_tiny_size_still_gives_a_valid_minimal_document() -> None:
    json.loads(_file(size=1))


def test_five_megabytes_stream_in_bounded_chunks() -> None:
    chunks = generate_export(
        "big", seed=0, size=5_000_000, history=False, definitions=True, merged=False, merged_count=2
    )
    sizes: list[int] = []

    def measured() -> Iterator[bytes]:
        for chunk in chunks:
            sizes.append(len(chunk))
            yield chunk

    sha, total = digest_export(measured())
    assert total == 5_000_000
    assert max(sizes) < 2 * CHUNK_BYTES  # never the whole file at once
    assert len(sha) == 64
