"""Tests for worker/deliverable/storage.py on file:// (a tmp folder) and memory:///."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.deliverable.storage import DOWNLOAD_CHUNK_BYTES, UPLOAD_PART_BYTES, Storage
from worker.errors import StorageError


@pytest.fixture(params=["file", "memory"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "file":
        yield Storage((tmp_path / "missing" / "root").as_uri())
    else:
        yield Storage("memory:///")


def test_bytes_round_trip(storage: Storage) -> None:
    storage.put_bytes("jobs/j1/manifest.json", b'{"ok": true}')

    assert storage.get_bytes("jobs/j1/manifest.json") == b'{"ok": true}'


def test_put_bytes_overwrites(storage: Storage) -> None:
    storage.put_bytes("jobs/j1/manifest.json", b"first")
    storage.put_bytes("jobs/j1/manifest.json", b"second")

    assert storage.get_bytes("jobs/j1/manifest.json") == b"second"


def test_file_round_trip_streamed(storage: Storage, tmp_path: Path) -> None:
    data = bytes(range(256)) * (12 * 1024 * 4)  # 12 MiB: above the multipart threshold
    source = tmp_path / "profile.json"
    source.write_bytes(data)

    storage.put_file("jobs/j1/profiles/0.json", source)

    chunks = list(storage.iter_bytes("jobs/j1/profiles/0.json"))
    assert b"".join(chunks) == data
    if storage.url.startswith("file:"):  # memory:/// hands back its one buffer
        assert len(chunks) > 1
    assert all(len(c) >= DOWNLOAD_CHUNK_BYTES for c in chunks[:-1])


def test_exists(storage: Storage) -> None:
    storage.put_bytes("jobs/j1/a.json", b"{}")

    assert storage.exists("jobs/j1/a.json")
    assert not storage.exists("jobs/j1/b.json")


def test_list_matches_whole_path_segments(storage: Storage) -> None:
    for key in ("jobs/j1/a.json", "jobs/j1/sub/b.json", "jobs/j10/c.json"):
        storage.put_bytes(key, b"{}")

    assert storage.list("jobs/j1") == ["jobs/j1/a.json", "jobs/j1/sub/b.json"]
    assert storage.list("jobs/j1/") == ["jobs/j1/a.json", "jobs/j1/sub/b.json"]
    assert storage.list("jobs/none") == []


def test_delete_prefix_removes_only_that_job(storage: Storage) -> None:
    for key in ("jobs/j1/a.json", "jobs/j1/sub/b.json", "jobs/j10/c.json"):
        storage.put_bytes(key, b"{}")

    deleted = storage.delete_prefix("jobs/j1")

    assert deleted == ["jobs/j1/a.json", "jobs/j1/sub/b.json"]
    assert storage.list("jobs") == ["jobs/j10/c.json"]
    assert storage.delete_prefix("jobs/j1") == []


def test_delete_prefix_refuses_an_empty_prefix(storage: Storage) -> None:
    storage.put_bytes("jobs/j1/a.json", b"{}")

    with pytest.raises(StorageError):
        storage.delete_prefix("/")

    assert storage.exists("jobs/j1/a.json")


def test_check_passes_on_a_working_store(storage: Storage) -> None:
    storage.check()


def test_missing_object_is_a_storage_error(storage: Storage) -> None:
    with pytest.raises(StorageError, match="cannot read"):
        storage.get_bytes("jobs/none.json")
    with pytest.raises(StorageError):
        list(storage.iter_bytes("jobs/none.json"))


def test_invalid_key_is_a_storage_error(storage: Storage) -> None:
    with pytest.raises(StorageError):
        storage.put_bytes("jobs/../../escape.json", b"{}")


def test_local_store_creates_its_root_and_writes_real_files(tmp_path: Path) -> None:
    root = tmp_path / "new" / "root"
    storage = Storage(root.as_uri())

    storage.put_bytes("jobs/j1/manifest.json", b"{}")

    assert (root / "jobs" / "j1" / "manifest.json").read_bytes() == b"{}"
    assert (
        storage.location("jobs/j1/manifest.json")
        == (root / "jobs" / "j1" / "manifest.json").as_uri()
    )
    # No staging file is left next to the object once the write is done.
    assert sorted(p.name for p in (root / "jobs" / "j1").iterdir()) == ["manifest.json"]


def test_location_keeps_the_url_prefix() -> None:
    assert Storage("memory:///").location("jobs/j1/a.json") == "memory:///jobs/j1/a.json"


def test_location_for_s3_needs_no_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    storage = Storage("s3://bucket/exports")

    assert storage.location("jobs/j1/a.json") == "s3://bucket/exports/jobs/j1/a.json"


@pytest.mark.parametrize("url", ["ftp://host/path", "not a url", "http://example.com/x"])
def test_unsupported_url_is_a_storage_error(url: str) -> None:
    with pytest.raises(StorageError, match="unsupported"):
        Storage(url)


def test_root_that_cannot_be_created_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")

    with pytest.raises(StorageError) as caught:
        Storage((blocker / "root").as_uri())

    assert "\n" not in str(caught.value)


def test_unreadable_source_file_is_a_storage_error(tmp_path: Path) -> None:
    storage = Storage("memory:///")

    with pytest.raises(StorageError):
        storage.put_file("jobs/j1/a.json", tmp_path / "missing.json")


def test_local_store_keeps_exports_private_to_this_user(tmp_path: Path) -> None:
    """Under the usual umask (022) another local user could read every export before."""
    root = tmp_path / "exports"
    storage = Storage(root.as_uri())
    big = tmp_path / "profile.json"
    big.write_bytes(b"x" * (UPLOAD_PART_BYTES + 1024))  # multipart
    small = tmp_path / "report.json"
    small.write_bytes(b"{}")
    old_umask = os.umask(0o022)
    try:
        storage.put_file("jobs/j1/profiles/0.json", big)
        storage.put_file("jobs/j1/report.json", small)
        storage.put_bytes("jobs/j1/manifest.json", b"{}")
        storage.put_bytes("jobs/j1/manifest.json", b'{"again": true}')  # a rewrite too
        storage.put_bytes("deletions/j0.json", b"{}")
    finally:
        os.umask(old_umask)

    files = sorted(p for p in root.rglob("*") if p.is_file())
    folders = [root] + sorted(p for p in root.rglob("*") if p.is_dir())
    assert len(files) == 4 and len(folders) == 5
    assert {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in files} == {
        "deletions/j0.json": 0o600,
        "jobs/j1/manifest.json": 0o600,
        "jobs/j1/profiles/0.json": 0o600,
        "jobs/j1/report.json": 0o600,
    }
    assert {p.stat().st_mode & 0o777 for p in folders} == {0o700}


def test_local_store_restricts_a_folder_an_older_version_left_open(tmp_path: Path) -> None:
    root = tmp_path / "exports"
    (root / "jobs").mkdir(parents=True, mode=0o755)
    (root / "jobs").chmod(0o755)
    Storage(root.as_uri()).put_bytes("jobs/j1/manifest.json", b"{}")

    assert (root / "jobs").stat().st_mode & 0o777 == 0o700
    assert (root / "jobs" / "j1").stat().st_mode & 0o777 == 0o700
