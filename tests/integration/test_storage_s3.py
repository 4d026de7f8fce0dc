"""worker/deliverable/storage.py against a real S3 protocol server (moto on 127.0.0.1)."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import boto3
import pytest

from worker.deliverable.storage import UPLOAD_PART_BYTES, Storage
from worker.errors import StorageError

pytestmark = pytest.mark.integration

BUCKET = "exports"
ACCESS_KEY = "test-access-key"
SECRET_KEY = "test-secret-key-do-not-leak"


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return s3_endpoint


@pytest.fixture
def s3_client(s3_env: str) -> Any:
    client = boto3.client(
        "s3",
        endpoint_url=s3_env,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    yield client
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=item["Key"])
    client.delete_bucket(Bucket=BUCKET)


@pytest.fixture
def storage(s3_client: Any) -> Storage:
    return Storage(f"s3://{BUCKET}/prefix")


def test_bytes_round_trip_under_the_url_prefix(storage: Storage, s3_client: Any) -> None:
    storage.put_bytes("jobs/j1/manifest.json", b'{"ok": true}')

    assert storage.get_bytes("jobs/j1/manifest.json") == b'{"ok": true}'
    head = s3_client.head_object(Bucket=BUCKET, Key="prefix/jobs/j1/manifest.json")
    assert head["ContentType"] == "application/json"
    assert storage.location("jobs/j1/manifest.json") == (
        f"s3://{BUCKET}/prefix/jobs/j1/manifest.json"
    )


def test_exists_list_and_delete_prefix(storage: Storage) -> None:
    for key in ("jobs/j1/a.json", "jobs/j1/sub/b.json", "jobs/j10/c.json"):
        storage.put_bytes(key, b"{}")

    assert storage.exists("jobs/j1/a.json")
    assert not storage.exists("jobs/j1/none.json")
    assert storage.list("jobs/j1") == ["jobs/j1/a.json", "jobs/j1/sub/b.json"]
    assert storage.delete_prefix("jobs/j1") == ["jobs/j1/a.json", "jobs/j1/sub/b.json"]
    assert storage.list("jobs") == ["jobs/j10/c.json"]


def test_big_file_goes_multipart_and_streams_back(
    storage: Storage, s3_client: Any, tmp_path: Path
) -> None:
    size = 20 * 1024 * 1024
    source = tmp_path / "profile.json"
    with source.open("wb") as f:
        for n in range(size // 4096):
            f.write(n.to_bytes(4, "big") * 1024)

    storage.put_file("jobs/j1/profiles/0.json", source)

    head = s3_client.head_object(Bucket=BUCKET, Key="prefix/jobs/j1/profiles/0.json")
    assert head["ContentLength"] == size
    parts = -(-size // UPLOAD_PART_BYTES)
    assert head["ETag"].strip('"').endswith(f"-{parts}")  # S3's multipart ETag form
    got = b"".join(storage.iter_bytes("jobs/j1/profiles/0.json"))
    assert got == source.read_bytes()


def test_check_passes_when_reachable(storage: Storage) -> None:
    storage.check()


def test_missing_bucket_is_a_storage_error_without_secrets(s3_env: str) -> None:
    storage = Storage("s3://no-such-bucket/prefix")

    with pytest.raises(StorageError) as caught:
        storage.check()

    assert SECRET_KEY not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_unreachable_endpoint_is_a_storage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    storage = Storage(f"s3://{BUCKET}/prefix")

    started = time.monotonic()
    with pytest.raises(StorageError, match="unreachable") as caught:
        storage.check()

    assert time.monotonic() - started < 30  # bounded retries, not obstore's 3 minutes
    assert SECRET_KEY not in str(caught.value)


@pytest.mark.parametrize(
    ("sse", "kms_key", "expected"),
    [("AES256", None, "AES256"), ("aws:kms", "alias/apsis-exports", "aws:kms")],
)
def test_server_side_encryption_is_requested_on_every_put(
    s3_client: Any, tmp_path: Path, sse: str, kms_key: str | None, expected: str
) -> None:
    storage = Storage(f"s3://{BUCKET}/sse", sse=sse, sse_kms_key_id=kms_key)
    storage.put_bytes("small.json", b"{}")
    big = tmp_path / "big.json"
    big.write_bytes(b"x" * (UPLOAD_PART_BYTES + 1024))  # multipart
    storage.put_file("big.json", big)
    for key in ("sse/small.json", "sse/big.json"):
        head = s3_client.head_object(Bucket=BUCKET, Key=key)
        assert head["ServerSideEncryption"] == expected
        if kms_key:
            assert kms_key in head.get("SSEKMSKeyId", "")
