"""A real job's package.zip: unzipped, checked with sha256sum, its CSV files parsed, its
index.html rendered in headless Chromium; and expiring links to it from S3 (moto's server),
downloaded with a plain HTTP client."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import subprocess
import urllib.request
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
import redis
from e2e_support import (
    OUTPUT,
    StackFactory,
    apsis_export,
    find_chromium,
    run_chromium,
    screenshot,
    wait_final,
)

from worker.deliverable.csv_cells import neutralise
from worker.deliverable.storage import Storage
from worker.model.jobs import JobStore, State

pytestmark = pytest.mark.integration

BUCKET = "gdpr-packages"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "package-test-key",
    "AWS_SECRET_ACCESS_KEY": "package-test-secret",
    "AWS_REGION": "eu-west-1",
}


def test_a_real_jobs_package_checks_out_parses_and_renders(
    make_stack: StackFactory, redis_db: redis.Redis, tmp_path: Path
) -> None:
    chromium = find_chromium()
    stack = make_stack()
    key = "zoe.package@example.com"
    stack.sandbox_put("/_sandbox/faults", {"keys": {key: {"merged_count": 1}}})
    job_id = stack.submit(
        key,
        include_attribute_history=True,
        include_type_definitions=True,
        include_merged_profiles=True,
        reference="DSAR-2024-17",
    )
    (job,) = wait_final(JobStore(redis_db), [job_id])
    assert job.state == State.DONE, job.error

    storage = Storage(stack.env["STORAGE_URL"])
    manifest = json.loads(storage.get_bytes(f"jobs/{job_id}/manifest.json"))
    package = storage.get_bytes(f"jobs/{job_id}/package.zip")
    assert manifest["package"]["object"] == f"jobs/{job_id}/package.zip"
    assert hashlib.sha256(package).hexdigest() == manifest["package"]["sha256"]
    folder = tmp_path / "unzipped"
    zipfile.ZipFile(io.BytesIO(package)).extractall(folder)

    # What a person (or a DPO) runs to check the package: every line "OK", exit 0.
    checked = subprocess.run(
        ["sha256sum", "-c", "checksums.sha256"],
        cwd=folder,
        capture_output=True,
        encoding="utf-8",
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert checked.stdout.count(": OK\n") == len(files) - 1  # all but checksums.sha256

    # The person's values, as the profile documents hold them, are in the CSV files.
    requested = json.loads((folder / "profiles/0.json").read_text("utf-8"))
    assert requested["export_key"] == key
    cells: set[str] = set()
    csv_files = [f for f in files if f.endswith(".csv")]
    assert {Path(f).name for f in csv_files} == {"attributes.csv", "history.csv", "events.csv"}
    for name in csv_files:
        with (folder / name).open(encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f))
        assert len(rows) >= 2 and all(len(row) == len(rows[0]) for row in rows), name
        cells |= {cell for row in rows for cell in row}
    names = set()
    for section in requested["sections"].values():
        for attribute in section["attributes"].values():
            # A value a spreadsheet would run ("+46 70 …") starts with ' (csv_cells.py).
            assert neutralise(attribute["value"]) in cells
            names.add(attribute["name"])
            for entry in attribute["history"]:
                assert neutralise(entry["value"]) in cells and entry["changed_at"] in cells
        for event in section["events"]:
            assert event["event_time"] in cells and event["name"] in cells
    assert names <= cells  # the type definitions' names are the column headers

    page = folder / "index.html"
    dom = run_chromium(chromium, tmp_path / "profile-dom", "--dump-dom", page.as_uri())
    assert "Your personal data" in dom and "DSAR-2024-17" in dom
    for text in [key, f"{key}~merged-1", *names, "checksums.sha256"]:
        assert text in dom, f"{text!r} not rendered"
    OUTPUT.mkdir(exist_ok=True)
    for label, window in (("laptop", "1200,2400"), ("phone", "390,2400")):
        shot = OUTPUT / f"package-index-{label}.png"
        screenshot(chromium, page, shot, window=window, profile_dir=tmp_path / f"shot-{label}")
        assert shot.stat().st_size > 10_000  # a rendered page, not a blank one


@pytest.fixture
def s3(s3_endpoint: str) -> Any:
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=CREDENTIALS["AWS_REGION"],
    )
    client.create_bucket(
        Bucket=BUCKET,
        CreateBucketConfiguration={"LocationConstraint": CREDENTIALS["AWS_REGION"]},
    )
    yield client
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=item["Key"])
    client.delete_bucket(Bucket=BUCKET)


def _get(url: str) -> bytes:
    """The link, fetched as a person's browser would: a plain GET, no credentials."""
    with urllib.request.urlopen(url, timeout=30) as answer:
        body: bytes = answer.read()
    return body


def _signed_for(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "client-side-encrypted"])
def test_a_link_downloads_the_exact_package_from_s3(
    make_stack: StackFactory,
    redis_db: redis.Redis,
    s3_endpoint: str,
    s3: Any,
    encrypted: bool,
) -> None:
    env = {"AWS_ENDPOINT_URL": s3_endpoint, **CREDENTIALS}
    if encrypted:
        env["STORAGE_ENCRYPTION_KEY"] = base64.b64encode(os.urandom(32)).decode()
    stack = make_stack(storage_url=f"s3://{BUCKET}/gdpr", env=env)
    key = "link.person@example.com"
    job_id = stack.submit(key, include_attribute_history=True, deliver="2h")
    (job,) = wait_final(JobStore(redis_db), [job_id])
    assert job.state == State.DONE, job.error
    stored = s3.get_object(Bucket=BUCKET, Key=f"gdpr/jobs/{job_id}/package.zip")["Body"].read()

    # The link the caller asked for (deliver="2h") is in the job's result.
    asked = job.extra["package_link"]
    # And one made by a DPO afterwards, from the command line.
    made = apsis_export(stack, "link", job_id, "--expires", "30m")
    assert made.returncode == 0, made.stderr
    url = made.stdout.strip()
    assert "valid until" in made.stderr and url not in made.stderr
    for link, seconds in ((asked, 7200), (url, 1800)):
        body = _get(link)
        zipfile.ZipFile(io.BytesIO(body)).testzip()
        if encrypted:
            # Stored as ciphertext; the link serves a decrypted copy a person can open.
            assert stored.startswith(b"APSISENC") and not body.startswith(b"APSISENC")
            assert f"/gdpr/deliveries/{job_id}/" in urlsplit(link).path
        else:
            assert body == stored
            assert urlsplit(link).path == f"/{BUCKET}/gdpr/jobs/{job_id}/package.zip"
        # Exactly the bytes the manifest vouches for (the job record keeps that digest too).
        assert hashlib.sha256(body).hexdigest() == job.extra["package_sha256"]
        # moto does not check presigned signatures or expiry (a tampered or expired link
        # still downloads there), so what S3 would enforce is checked in the link itself:
        # a SigV4 signature over the GET of this one object, for the time asked.
        signed = _signed_for(link)
        assert signed["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
        assert signed["X-Amz-Expires"] == [str(seconds)]
        assert signed["X-Amz-SignedHeaders"] == ["host"]
        assert len(signed["X-Amz-Signature"][0]) == 64
        assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in link

    # Links are bearer credentials: never in the events stream.
    events: list[tuple[bytes, dict[bytes, bytes]]] = redis_db.xrange("apsis:events")  # type: ignore[assignment]
    assert events and all(b"X-Amz-Signature" not in v for _, e in events for v in e.values())
    # ...but the package's object name is, for the services that hand it over.
    assert [e[b"package"] for _, e in events if e[b"job_id"] == job_id.encode()] == [
        f"jobs/{job_id}/package.zip".encode()
    ]
    # The delivery copies of an encrypted store are indexed for the sweep, by their expiry.
    copies = redis_db.zrange("apsis:deliveries", 0, -1)
    assert len(copies) == (2 if encrypted else 0)
