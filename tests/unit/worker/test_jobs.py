"""worker/model/jobs.py: the job record and its atomic, idempotent transitions."""

from __future__ import annotations

import fakeredis
import pytest

from worker.errors import JobIdConflict, JobNotFound
from worker.model.jobs import ExportOptions, JobStore, State


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
    # The same request again (another reference or deadline is no different export): one job.
    assert not jobs.create(
        "job1",
        export_key="someone@example.com",
        account="acct",
        options=ExportOptions(include_attribute_history=True),
        deadline_seconds=1,
        reference="REF-2",
    )
    job = jobs.get("job1")
    assert job.export_key == "someone@example.com"
    assert job.state == State.QUEUED
    assert job.options.include_attribute_history
    assert job.reference == "REF-1"
    assert jobs.counts() == {"queued": 1}


@pytest.mark.parametrize(
    ("change", "value"),
    [
        ("export_key", "frank@example.com"),
        ("account", "other-acct"),
        ("options", ExportOptions()),
        ("batch_id", "DSAR"),
    ],
)
def test_a_reused_job_id_for_another_export_is_refused(
    jobs: JobStore, change: str, value: object
) -> None:
    _create(jobs)
    request: dict[str, object] = {
        "export_key": "someone@example.com",
        "account": "acct",
        "options": ExportOptions(include_attribute_history=True),
        "deadline_seconds": 3600,
    }
    request[change] = value
    with pytest.raises(JobIdConflict, match="job id job1 is already used for a different"):
        jobs.create("job1", **request)  # type: ignore[arg-type]
    job = jobs.get("job1")  # untouched: still the first request's job
    assert (job.export_key, job.account, job.batch_id) == ("someone@example.com", "acct", None)
    assert jobs.counts() == {"queued": 1}


def test_the_stored_purpose_says_nothing_about_the_export_key(jobs: JobStore) -> None:
    _create(jobs)
    raw = jobs._client.hget(jobs.key("job1"), "purpose")
    assert raw is not None and len(raw) == 64
    assert b"someone" not in raw
    assert "purpose" not in jobs.get("job1").extra


def test_a_job_created_before_a_secret_rotation_is_still_the_same_job() -> None:
    client = fakeredis.FakeRedis()
    old, new = "o" * 40, "n" * 40
    request = {"account": "acct", "options": ExportOptions(), "deadline_seconds": 60}
    JobStore(client, secrets=(old,)).create("job1", export_key="a@example.com", **request)  # type: ignore[arg-type]
    rotated = JobStore(client, secrets=(new, old))
    assert not rotated.create("job1", export_key="a@example.com", **request)  # type: ignore[arg-type]
    with pytest.raises(JobIdConflict):
        rotated.create("job1", export_key="b@example.com", **request)  # type: ignore[arg-type]
    # Without the old secret the first digest is not recognised: refused, never reused.
    with pytest.raises(JobIdConflict):
        JobStore(client, secrets=(new,)).create("job1", export_key="a@example.com", **request)  # type: ignore[arg-type]


def test_a_record_from_before_purposes_compares_what_it_holds(jobs: JobStore) -> None:
    _create(jobs)
    jobs._client.hdel(jobs.key("job1"), "purpose")  # as written by the previous release
    same = {"account": "acct", "options": ExportOptions(), "deadline_seconds": 60}
    assert not jobs.create("job1", export_key="someone@example.com", **same)  # type: ignore[arg-type]
    with pytest.raises(JobIdConflict):
        jobs.create("job1", export_key="frank@example.com", **same)  # type: ignore[arg-type]
    with pytest.raises(JobIdConflict):
        jobs.create("job1", export_key="someone@example.com", batch_id="B", **same)  # type: ignore[arg-type]


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
