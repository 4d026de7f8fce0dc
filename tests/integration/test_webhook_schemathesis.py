"""The real webhook under gunicorn, fuzzed by schemathesis from webhook/openapi.yaml.

No request the spec allows (or breaks) may answer 5xx, and every answer must be one the
spec documents, with the documented body and headers.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from worker.cli.embedded import free_port
from worker.model import callback_token
from worker.model.jobs import ExportOptions, JobStore, State

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SECRET = secrets.token_urlsafe(48)
JOB_ID = "schemathesis-job"
#: Seconds to wait for gunicorn to answer /healthz.
START_TIMEOUT = 20.0
#: Checks that make up "no 5xx and every response conforms to the spec".
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
#: Bounded fuzzing: examples per operation and the per-example deadline (ms).
FUZZ = settings(
    max_examples=50,
    deadline=2000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

schema = schemathesis.openapi.from_path(ROOT / "webhook" / "openapi.yaml")


@pytest.fixture(scope="module")
def webhook_url(redis_url: str) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "CALLBACK_SECRET": SECRET}
    env.pop("CALLBACK_SECRET_PREVIOUS", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "webhook"]
        + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                stderr = process.stderr.read().decode() if process.stderr else ""
                pytest.fail(f"webhook exited with {process.returncode}: {stderr}")
            try:
                if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("webhook did not answer /healthz in time")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if process.stderr:
            process.stderr.close()


@pytest.fixture
def waiting_job(redis_db: redis.Redis) -> str:
    """A job waiting for APSIS, so a valid token reaches body validation and the inbox."""
    jobs = JobStore(redis_db)
    jobs.create(JOB_ID, export_key="k", account="a", options=ExportOptions(), deadline_seconds=3600)
    jobs.transition(JOB_ID, State.REQUESTED)
    return callback_token.issue(JOB_ID, 1, secret=SECRET, ttl=3600)


@pytest.mark.timeout(60)
@schema.parametrize()
@FUZZ
def test_any_request_gets_a_documented_answer(
    case: schemathesis.Case[Any], webhook_url: str, redis_db: redis.Redis
) -> None:
    case.call_and_validate(base_url=webhook_url, checks=CHECKS, timeout=5)


@pytest.mark.timeout(60)
@schema.include(path="/callbacks/{token}").parametrize()
@FUZZ
def test_bodies_under_a_valid_token_get_a_documented_answer(
    case: schemathesis.Case[Any], webhook_url: str, redis_db: redis.Redis, waiting_job: str
) -> None:
    case.path_parameters = {"token": waiting_job}
    # Reset the flood window, so most examples get past it to the inbox.
    redis_db.delete(f"apsis:flood:{JOB_ID}")
    response = case.call_and_validate(base_url=webhook_url, checks=CHECKS, timeout=5)
    if response.status_code == 202:
        assert redis_db.xlen("apsis:inbox") > 0
    assert JobStore(redis_db).get(JOB_ID).state == State.REQUESTED
