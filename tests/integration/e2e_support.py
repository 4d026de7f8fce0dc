"""Helpers the integration tests share (pytest imports this folder's modules by name)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from worker.jobs import FINAL, Job, JobStore
from worker.stack import LocalStack

StackFactory = Callable[..., LocalStack]


def wait_final(jobs: JobStore, job_ids: list[str], *, timeout: float = 60.0) -> list[Job]:
    """Poll until every job has ended; fail the test with the stragglers' states if not."""
    deadline = time.monotonic() + timeout
    while True:
        found = [jobs.find(job_id) for job_id in job_ids]
        if all(job is not None and job.state in FINAL for job in found):
            return [job for job in found if job is not None]
        if time.monotonic() > deadline:
            states = [job.state.value if job else "missing" for job in found]
            pytest.fail(f"jobs not final after {timeout} s: {sorted(set(states))}")
        time.sleep(0.1)
