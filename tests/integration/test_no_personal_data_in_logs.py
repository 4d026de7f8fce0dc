"""Export keys are personal data: none may reach a log line or an object path.

A handful of exports with distinctive keys (plain, unicode, merged, failing, unknown) runs
through the real stack once; the tests then read every log file and every stored path.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from e2e_support import wait_final

from worker.cli.stack import LocalStack
from worker.model.jobs import Job, JobStore, State

pytestmark = pytest.mark.integration

MERGED_COUNT = 2


@dataclass
class Run:
    stack: LocalStack
    log_dir: Path
    storage_root: Path
    jobs: dict[str, Job]  # export key -> the finished job
    #: Every string that must not appear: keys, merged keys, local parts (and JSON escapes).
    canaries: list[str]


def _forms(text: str) -> set[str]:
    """``text`` as it could appear in a log: raw, and JSON-escaped (``\\u00fc`` for ``ü``)."""
    return {text, json.dumps(text)[1:-1]}


@pytest.fixture(scope="module")
def run(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tag = secrets.token_hex(4)
    plain = f"pii-canary-{tag}@example.com"
    unicode_key = f"pii-ünïcødé-{tag}@exämple.com"
    merged = f"pii-merged-{tag}@example.com"
    failing = f"pii-failing-{tag}@example.com"
    unknown = f"unknown-pii-{tag}@example.com"  # the sandbox answers 404 to "unknown*" keys
    merging = {unicode_key, merged}

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    base = tmp_path_factory.mktemp("pii")
    storage_root = base / "exports"
    stack = LocalStack(
        redis_url=redis_url,
        storage_url=f"file://{storage_root}",
        log_dir=base,
        env={"APSIS_EXPORT_RATE": "50", "LOG_LEVEL": "DEBUG"},
    )
    try:
        stack.start()
        requests.patch(
            f"{stack.apsis_url}/_sandbox/config",
            json={"limits": {"export": [100, 1.0], "download": [100, 1.0]}},
            timeout=5,
        ).raise_for_status()
        stack.sandbox_put(
            "/_sandbox/faults",
            {
                "keys": {
                    **{key: {"merged_count": MERGED_COUNT} for key in merging},
                    failing: {"failure_code": 500},
                }
            },
        )
        keys = [plain, unicode_key, merged, failing, unknown]
        job_ids = {
            key: stack.submit(key, include_merged_profiles=key in merging, reference="GDPR-1")
            for key in keys
        }
        finished = wait_final(JobStore(client), list(job_ids.values()), timeout=90)
        canaries: set[str] = set()
        for key in keys:
            local_part = key.split("@", 1)[0]
            canaries |= _forms(key) | _forms(local_part)
            for n in range(1, MERGED_COUNT + 1):
                canaries |= _forms(f"{key}~merged-{n}")
        yield Run(
            stack=stack,
            log_dir=base,
            storage_root=storage_root,
            jobs=dict(zip(keys, finished, strict=True)),
            canaries=sorted(canaries),
        )
    finally:
        stack.stop()
        client.flushdb()
        client.close()


def _log_files(run: Run) -> list[Path]:
    files = sorted(run.log_dir.glob("*.log"))
    assert {"webhook.log", "worker-1.log"} <= {f.name for f in files}
    return files


def test_the_exports_ran_as_a_user_would_expect(run: Run) -> None:
    states = {key.split("-")[1]: job.state for key, job in run.jobs.items()}
    assert states == {
        "canary": State.DONE,
        "ünïcødé": State.DONE,
        "merged": State.DONE,
        "failing": State.FAILED,
        "pii": State.FAILED,  # the unknown key
    }
    merged_jobs = [job for key, job in run.jobs.items() if "merged" in key or "ü" in key]
    assert all(job.profiles == 1 + MERGED_COUNT for job in merged_jobs)


def test_no_export_key_appears_in_any_log(run: Run) -> None:
    leaks: list[str] = []
    for path in _log_files(run):
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            for canary in run.canaries:
                if canary in line:
                    leaks.append(f"{path.name}:{number}: {canary!r} in {line[:300]}")
    assert leaks == [], "personal data in logs:\n" + "\n".join(leaks)


def test_no_export_key_appears_in_any_object_path(run: Run) -> None:
    paths = [
        os.path.relpath(os.path.join(folder, name), run.storage_root)
        for folder, dirs, files in os.walk(run.storage_root)
        for name in [*dirs, *files]
    ]
    assert any(p.endswith("manifest.json") for p in paths)  # something was stored
    leaks = [p for p in paths for canary in run.canaries if canary in p]
    assert leaks == []


def _json_lines(path: Path) -> list[dict[str, Any]]:
    parsed = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("{"):
            try:
                parsed.append(json.loads(line))
            except ValueError:
                pytest.fail(f"{path.name}:{number} is not one JSON object: {line[:200]}")
    return parsed


def test_worker_logs_are_json_lines_that_name_the_job(run: Run) -> None:
    lines = [
        line for path in _log_files(run) if "worker" in path.name for line in _json_lines(path)
    ]
    pipeline = [line for line in lines if line.get("logger") == "apsis.pipeline"]
    without_job = [line for line in pipeline if "job_id" not in line]
    assert without_job == []
    # Each export can be followed through the worker's log by its job id alone.
    for key, job in run.jobs.items():
        about = [line for line in pipeline if line.get("job_id") == job.job_id]
        assert about, f"no JSON log line carries the job id of the {key.split('-')[1]} export"
        if job.state == State.FAILED:
            assert any(line["level"] == "error" for line in about)
