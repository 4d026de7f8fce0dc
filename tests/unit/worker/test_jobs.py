"""worker/jobs.py: the job record and its atomic, idempotent transitions."""

from __future__ import annotations

import fakeredis
import pytest

from worker.errors import JobNotFound
from worker.jobs import ExportOptions, JobStore, State


@pytest.fixture
def jobs() -> JobStore:
    return JobStore(fakeredis.FakeRedis())


def _create(jobs: JobStore, job_id: str = "job1", **kwargs: object) -> None:
    assert jobs.create(
        job_id,
        export_key="someone@example.com",
        account="acct",
        options=ExportOptions(include_attribute_history=True),
        deadline_seconds=3600,
        reference="REF-1",
        **kwargs,  # type: ignore[arg-type]
    )


def test_create_is_idempotent_on_the_job_id(jobs: JobStore) -> None:
    _create(jobs)
    assert not jobs.create(
        "job1", export_key="other", account="acct", options=ExportOptions(), deadline_seconds=1
    )
    job = jobs.get("job1")
    assert job.export_key == "someone@example.com"
    assert job.state == State.QUEUED
    assert job.options.include_attribute_history
    assert job.reference == "REF-1"
    assert jobs.counts() == {"queued": 1}


def test_unknown_job_raises_job_not_found(jobs: JobStore) -> None:
    with pytest.raises(JobNotFound):
        jobs.get("nope")
    assert jobs.find("nope") is None


def test_happy_path_records_history_and_counts(jobs: JobStore) -> None:
    _create(jobs)
    assert jobs.transition("job1", State.REQUESTED, waiting_until=100.0, note="sent") == (
        True,
        State.REQUESTED,
    )
    assert jobs.overdue(now=101.0) == ["job1"]
    assert jobs.transition("job1", State.VERIFIED, keep_waiting=True)[0]
    assert jobs.overdue(now=101.0) == ["job1"]  # still waiting for the ready callback
    assert jobs.transition("job1", State.READY, fields={"download_url": "https://x/y"})[0]
    assert jobs.overdue(now=101.0) == []
    assert jobs.transition("job1", State.DONE)[0]
    assert [h["state"] for h in jobs.history("job1")] == [
        "queued",
        "requested",
        "verified",
        "ready",
        "done",
    ]
    assert jobs.get("job1").download_url == "https://x/y"
    assert jobs.counts() == {"queued": 0, "requested": 0, "verified": 0, "ready": 0, "done": 1}


def test_a_repeated_or_out_of_order_transition_is_a_no_op(jobs: JobStore) -> None:
    _create(jobs)
    jobs.transition("job1", State.REQUESTED)
    assert jobs.transition("job1", State.READY)[0]
    # A duplicate "ready" and a late "verified" change nothing.
    assert jobs.transition("job1", State.READY) == (False, State.READY)
    assert jobs.transition("job1", State.VERIFIED) == (False, State.READY)
    assert len(jobs.history("job1")) == 3


def test_a_transition_for_an_older_attempt_is_refused(jobs: JobStore) -> None:
    _create(jobs)
    jobs.transition("job1", State.REQUESTED, attempt=1)
    assert jobs.transition("job1", State.QUEUED, attempt=1, new_attempt=True)[0]
    assert jobs.get("job1").attempt == 2
    assert jobs.transition("job1", State.REQUESTED, attempt=1) == (False, State.QUEUED)
    assert jobs.transition("job1", State.REQUESTED, attempt=2) == (True, State.REQUESTED)


def test_final_states_are_final(jobs: JobStore) -> None:
    _create(jobs)
    jobs.transition("job1", State.FAILED, fields={"error": "why"})
    assert jobs.get("job1").error == "why"
    for state in (State.REQUESTED, State.VERIFIED, State.READY, State.DONE):
        assert jobs.transition("job1", state) == (False, State.FAILED)


def test_transition_on_a_missing_job_applies_nothing(jobs: JobStore) -> None:
    assert jobs.transition("ghost", State.REQUESTED) == (False, None)
    assert not jobs.exists("ghost")


def test_retries_are_counted_on_the_job(jobs: JobStore) -> None:
    _create(jobs)
    assert [jobs.count_retry("job1") for _ in range(3)] == [1, 2, 3]
    assert jobs.get("job1").retries == 3
