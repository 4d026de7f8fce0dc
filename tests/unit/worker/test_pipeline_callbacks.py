"""worker/flow/pipeline.py's callback handling: idempotent, attempt-aware, one fetch per ready."""

from __future__ import annotations

from typing import Any

import pytest
from job_support import make_runtime

from worker.errors import InvalidExportKey
from worker.flow import pipeline
from worker.flow.runtime import Runtime
from worker.model import batch_store, ids
from worker.model.inbox import Callback
from worker.model.jobs import ExportOptions, State


@pytest.fixture
def rt() -> Runtime:
    return make_runtime()


class Dispatched(list[tuple[str, list[Any]]]):
    """Task name and job id of each dispatch (a fetch also carries its download slot)."""

    def __call__(self, name: str, args: list[Any]) -> None:
        self.append((name, args[:1]))


def _job(rt: Runtime, state: State = State.REQUESTED) -> str:
    pipeline.submit(rt, "key@example.com", options=ExportOptions(), job_id="j1")
    if state != State.QUEUED:
        rt.jobs.transition("j1", State.REQUESTED)
    if state == State.READY:
        rt.jobs.transition("j1", State.READY, fields={"ready_entry": "1-0"})
    return "j1"


def _cb(code: int, entry: str = "5-0", attempt: int = 1, message: str = "") -> Callback:
    return Callback(entry, "j1", attempt, code, message or "https://x/y", 0.0)


def test_ready_dispatches_one_fetch_and_duplicates_none(rt: Runtime) -> None:
    _job(rt)
    sent = Dispatched()
    assert pipeline.apply_callback(rt, _cb(200, "7-0"), sent) == "ready"
    assert pipeline.apply_callback(rt, _cb(200, "8-0"), sent) == "duplicate"
    assert pipeline.apply_callback(rt, _cb(100, "9-0"), sent) == "duplicate"
    assert sent == [(pipeline.FETCH_TASK, ["j1"])]
    assert rt.jobs.get("j1").download_url == "https://x/y"


def test_redelivered_ready_entry_dispatches_again() -> None:
    """The consumer may die between the transition and the dispatch: the same entry resends."""
    rt = make_runtime(APSIS_DOWNLOAD_RATE=6000)  # a download slot free at once, both times
    _job(rt)
    sent = Dispatched()
    pipeline.apply_callback(rt, _cb(200, "7-0"), sent)
    assert pipeline.apply_callback(rt, _cb(200, "7-0"), sent) == "ready"
    assert sent == [(pipeline.FETCH_TASK, ["j1"])] * 2


def test_a_ready_export_waits_in_the_download_line_when_no_slot_is_free() -> None:
    """At the documented 60 downloads/min, two ready exports at once: the first is
    dispatched with its slot, the second waits in the account's download line, in order."""
    rt = make_runtime()
    for job_id in ("j1", "j2"):
        pipeline.submit(rt, f"{job_id}@example.com", options=ExportOptions(), job_id=job_id)
        rt.jobs.transition(job_id, State.REQUESTED)
    sent = Dispatched()
    for n, job_id in enumerate(("j1", "j2")):
        callback = Callback(f"{n + 7}-0", job_id, 1, 200, "https://x/y", 0.0)
        assert pipeline.apply_callback(rt, callback, sent) == "ready"
    assert sent == [(pipeline.FETCH_TASK, ["j1"])]
    account = rt.settings.APSIS_ACCOUNT
    place = rt.fetches.place(account, "j2")
    assert place is not None and (place.lane, place.ahead) == ("single", 0)


def test_ready_before_verified_still_works(rt: Runtime) -> None:
    _job(rt)
    sent = Dispatched()
    assert pipeline.apply_callback(rt, _cb(200), sent) == "ready"
    assert pipeline.apply_callback(rt, _cb(100, "6-0"), sent) == "duplicate"
    assert rt.jobs.get("j1").state == State.READY


def test_callbacks_for_an_older_attempt_or_unknown_job_are_ignored(rt: Runtime) -> None:
    _job(rt)
    sent = Dispatched()
    assert pipeline.apply_callback(rt, _cb(200, attempt=0), sent) == "stale"
    assert pipeline.apply_callback(rt, Callback("1-1", "ghost", 1, 200, "u", 0), sent) == (
        "unknown_job"
    )
    assert sent == []
    assert rt.jobs.get("j1").state == State.REQUESTED


def test_failure_code_rerequests_with_a_new_attempt_then_fails(rt: Runtime) -> None:
    _job(rt)
    sent = Dispatched()
    assert pipeline.apply_callback(rt, _cb(500, message="boom"), sent) == "rerequested"
    job = rt.jobs.get("j1")
    assert (job.state, job.attempt) == (State.QUEUED, 2)
    assert sent == [(pipeline.REQUEST_TASK, ["j1"])]
    for attempt in range(2, pipeline.MAX_ATTEMPTS):
        rt.jobs.transition("j1", State.REQUESTED)
        pipeline.apply_callback(rt, _cb(500, attempt=attempt, entry=f"{attempt}-9"), sent)
    rt.jobs.transition("j1", State.REQUESTED)
    outcome = pipeline.apply_callback(
        rt, _cb(500, attempt=pipeline.MAX_ATTEMPTS, entry="99-0", message="boom"), sent
    )
    assert outcome == "failed"
    job = rt.jobs.get("j1")
    assert job.state == State.FAILED
    assert "failure code 500" in (job.error or "")
    assert b'"state": "failed"' in rt.storage.get_bytes("jobs/j1/manifest.json")


@pytest.mark.parametrize("bad", ["", "   ", "a" * 513, "a\nb", "a\x00b", "a\u2028b", 42])
def test_bad_export_keys_are_refused_without_echoing_them(bad: object) -> None:
    with pytest.raises(InvalidExportKey) as caught:
        ids.validate_export_key(bad)
    assert not isinstance(bad, str) or not bad.strip() or bad not in str(caught.value)


def test_backoff_honours_retry_after_and_caps() -> None:
    assert pipeline.backoff(0, retry_after=7) == 7
    assert pipeline.backoff(3, retry_after=10_000, cap=60) == 60
    delays = [pipeline.backoff(n) for n in range(20)]
    assert all(0 < d <= pipeline.BACKOFF_CAP for d in delays)
    assert pipeline.backoff(1) <= 4 < pipeline.backoff(5)


def test_a_batch_whose_last_job_fails_by_callback_is_finalized_at_once() -> None:
    from worker.flow import batches
    from worker.flow.batch_file import BatchItem

    rt = make_runtime(APSIS_CLIENT_ID="id", APSIS_CLIENT_SECRET="secret")
    batches.create(rt, "b1", [BatchItem("only@example.com")], options=ExportOptions())
    pipeline.submit(rt, "only@example.com", options=ExportOptions(), job_id="b1.0", batch_id="b1")
    for _ in range(pipeline.MAX_ATTEMPTS - 1):
        rt.jobs.transition("b1.0", State.REQUESTED)
        rt.jobs.transition("b1.0", State.QUEUED, new_attempt=True)
    rt.jobs.transition("b1.0", State.REQUESTED)
    sent = Dispatched()
    rt.dispatch = sent
    last = Callback("9-0", "b1.0", pipeline.MAX_ATTEMPTS, 500, "boom", 0.0)
    assert pipeline.apply_callback(rt, last, Dispatched()) == "failed"
    # Not left for the watchdog to notice minutes later: the batch is finalized now.
    assert (batch_store.FINALIZE_TASK, ["b1"]) in sent


def test_a_ready_export_is_dispatched_at_once_while_another_fetch_is_starting() -> None:
    """A fetch dispatched and not yet begun does not make the next ready export wait for
    the feeder (its resume latency): with a slot free, it leaves at once; with FETCH_AHEAD
    fetches waiting for a worker, it waits in line."""
    rt = make_runtime(APSIS_DOWNLOAD_RATE=6000)
    job_ids = [f"j{n}" for n in range(pipeline.FETCH_AHEAD + 1)]
    for job_id in job_ids:
        pipeline.submit(rt, f"{job_id}@example.com", options=ExportOptions(), job_id=job_id)
        rt.jobs.transition(job_id, State.REQUESTED)
    sent = Dispatched()
    for n, job_id in enumerate(job_ids):
        callback = Callback(f"{n + 7}-0", job_id, 1, 200, "https://x/y", 0.0)
        assert pipeline.apply_callback(rt, callback, sent) == "ready"
    assert sent == [(pipeline.FETCH_TASK, [j]) for j in job_ids[: pipeline.FETCH_AHEAD]]
    assert rt.fetches.place(rt.settings.APSIS_ACCOUNT, job_ids[-1]) is not None
