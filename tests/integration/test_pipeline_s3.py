"""The whole pipeline writing to S3 through its real protocol (moto's server on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import json

import boto3
import pytest
import redis
from e2e_support import StackFactory, wait_final

from worker.model.jobs import JobStore, State

pytestmark = pytest.mark.integration

BUCKET = "gdpr-exports"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "pipeline-test-key",
    "AWS_SECRET_ACCESS_KEY": "pipeline-test-secret",
    "AWS_REGION": "eu-west-1",
}


def test_export_lands_in_s3_with_manifest_last(
    make_stack: StackFactory, redis_db: redis.Redis, s3_endpoint: str
) -> None:
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=CREDENTIALS["AWS_REGION"],
    )
    s3.create_bucket(
        Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": CREDENTIALS["AWS_REGION"]}
    )
    stack = make_stack(
        storage_url=f"s3://{BUCKET}/gdpr",
        env={"AWS_ENDPOINT_URL": s3_endpoint, **CREDENTIALS},
    )
    stack.sandbox_put("/_sandbox/faults", {"keys": {"s3@example.com": {"merged_count": 1}}})
    job_id = stack.submit("s3@example.com", include_merged_profiles=True)
    (job,) = wait_final(JobStore(redis_db), [job_id])
    assert job.state == State.DONE, job.error
    assert job.manifest == f"s3://{BUCKET}/gdpr/jobs/{job_id}/manifest.json"

    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"gdpr/jobs/{job_id}/")
    keys = sorted(item["Key"] for item in listed["Contents"])
    assert keys == sorted(
        f"gdpr/jobs/{job_id}/{name}"
        for name in (
            "export.json",
            "manifest.json",
            "package.zip",
            "profiles/0.json",
            "profiles/1.json",
            "report.html",
            "report.json",
        )
    )
    manifest = json.loads(
        s3.get_object(Bucket=BUCKET, Key=f"gdpr/jobs/{job_id}/manifest.json")["Body"].read()
    )
    for entry in [manifest["source"], *manifest["profiles"]]:
        body = s3.get_object(Bucket=BUCKET, Key=f"gdpr/{entry['object']}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == entry["sha256"]
    # The manifest is the commit point: it was written after every object it lists.
    modified = {item["Key"]: item["LastModified"] for item in listed["Contents"]}
    assert modified[f"gdpr/jobs/{job_id}/manifest.json"] >= max(modified.values())
