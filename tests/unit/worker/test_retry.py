"""Issue 15, item 3: ``apsis-export retry`` (pipeline.restart) of a failed job.

The restart takes the job's end back from its batch (so the batch ends once, when the job
really ends), gives the job a fresh deadline and fresh budgets, and never reopens a batch that
has ended. Also: a failure callback that arrives while the job is still queued re-requests
at once instead of being dropped.
"""

from __future__ import annotations

import csv
import io
import time
from typing import Any

import pytest
from job_support import make_runtime, run_job

from worker.errors import BatchEnded
from worker.flow import batches, pipeline, watchdog
from worker.flow.batch_file import BatchItem
from worker.flow.runtime import Runtime
from worker.model import batch_store
from worker.model.inbox import Callback
from worker.model.jobs import ExportOptions, State

KEYS = ["ann@example.com", "bob@example.com", "cid@example.com"]


class Dispatched(list[tuple[str, list[Any]]]):
    def __call__(self, name: str, args: list[Any]) -> None:
        self.append((name, args))


@pytest.fixture
def rt() -> Runtime:
    return make_runtime(EXPORT_DEADLINE=86400, APSIS_CLIENT_ID="id", APSIS_CLIENT_SECRET="secret")


def _batch(rt: Runtime, batch_id: str = "b1", keys: list[str] = KEYS) -> None:
    items = [BatchItem(k) for k in keys]
    batches.create(rt, batch_id, items, options=ExportOptions(), chain={"task": "caller.t"})
    for n, key in enumerate(keys):
        pipeline.submit(
            rt, key, options=ExportOptions(), job_id=f"{batch_id}.{n}", batch_id=batch_id
        )


def _counts(rt: Runtime, batch_id: str = "b1") -> tuple[int, int, int, int]:
    batch = rt.batches.get(batch_id)
    return batch.done, batch.failed, batch.ended, batch.total


def test_a_retried_batch_item_is_not_counted_twice(rt: Runtime) -> None:
    """The issue's reproduction: 'done 2, failed 1, ended 3, total 3' with item 2 queued,
    and the batch finalized (item 2 'cancelled' in summary.csv) while it still ran."""
    _batch(rt)
    pipeline.fail(rt, "b1.2", "APSIS reported failure code 500: boom")
    assert _counts(rt) == (0, 1, 1, 3)

    sent = Dispatched()
    assert pipeline.restart(rt, rt.jobs.get("b1.2"), sent)
    assert sent == [(pipeline.REQUEST_TASK, ["b1.2"])]
    assert _counts(rt) == (0, 0, 0, 3)
    assert int(rt.redis.hget(batch_store.batch_key("b1"), "in_flight") or 0) == 3

    run_job(rt, "b1.0", export_key=KEYS[0], batch_id="b1")
    run_job(rt, "b1.1", export_key=KEYS[1], batch_id="b1")
    assert rt.jobs.get("b1.2").state == State.QUEUED
    assert _counts(rt) == (2, 0, 2, 3)
    batch = rt.batches.get("b1")
    assert not batch.complete and batch.in_flight == 1
    chains: list[dict[str, Any]] = []
    assert not batches.finalize(rt, "b1", lambda chain, result: chains.append(result))
    assert not rt.storage.exists(batches.summary_object("b1"))
    counts = rt.jobs.counts()
    assert (counts["queued"], counts["done"], counts["failed"]) == (1, 2, 0)

    run_job(rt, "b1.2", export_key=KEYS[2], batch_id="b1")
    assert _counts(rt) == (3, 0, 3, 3)
    assert batches.finalize(rt, "b1", lambda chain, result: chains.append(result))
    summary = rt.storage.get_bytes(batches.summary_object("b1")).decode()
    assert [row["state"] for row in csv.DictReader(io.StringIO(summary))] == ["done"] * 3
    assert [c["done"] for c in chains] == [3]  # the batch's chain ran once, when it ended


def test_an_old_job_retried_gets_a_fresh_deadline(rt: Runtime) -> None:
    """Created longer than EXPORT_DEADLINE ago: the next sweep must not fail it again."""
    created = time.time() - rt.settings.EXPORT_DEADLINE - 3600
    pipeline.submit(rt, "old@example.com", options=ExportOptions(), job_id="old1")
    rt.jobs.update("old1", {"created_at": created, "deadline": created + 86400})
    rt.redis.zadd(rt.jobs.deadlines_key, {rt.jobs.key("old1"): created + 86400})
    report = watchdog.sweep(rt, Dispatched(), lambda c, r: None)
    assert report.failed == ["old1"]

    assert pipeline.restart(rt, rt.jobs.get("old1"), Dispatched())
    report = watchdog.sweep(rt, Dispatched(), lambda c, r: None)
    assert report.failed == []
    job = rt.jobs.get("old1")
    assert job.state == State.QUEUED
    assert job.deadline >= time.time() + rt.settings.EXPORT_DEADLINE - 60


def test_a_retried_job_has_its_attempt_budget_again(rt: Runtime) -> None:
    """Failed after MAX_ATTEMPTS failure callbacks; after a retry a failure callback
    re-requests (as for a new job) instead of failing it at once."""
    pipeline.submit(rt, "key@example.com", options=ExportOptions(), job_id="j1")
    for attempt in range(1, pipeline.MAX_ATTEMPTS + 1):
        rt.jobs.transition("j1", State.REQUESTED)
        cb = Callback(f"{attempt}-0", "j1", attempt, 500, "boom", 0.0)
        pipeline.apply_callback(rt, cb, Dispatched())
    assert rt.jobs.get("j1").state == State.FAILED
    rt.jobs.update("j1", {"retry_at": time.time() + 3600})

    assert pipeline.restart(rt, rt.jobs.get("j1"), Dispatched())
    job = rt.jobs.get("j1")
    assert (job.attempt, job.retries, job.error) == (pipeline.MAX_ATTEMPTS + 1, 0, None)
    assert not job.extra.get("retry_at")
    assert "j1" not in rt.jobs.recent_failures()  # the status page lists it no more
    rt.jobs.transition("j1", State.REQUESTED)
    cb = Callback("9-0", "j1", job.attempt, 500, "boom", 0.0)
    assert pipeline.apply_callback(rt, cb, Dispatched()) == "rerequested"


def test_retry_of_an_item_of_an_ended_batch_is_refused(rt: Runtime) -> None:
    _batch(rt, "b2", KEYS[:1])
    pipeline.fail(rt, "b2.0", "APSIS reported failure code 410: gone")
    assert rt.batches.get("b2").complete  # its finalize is under way

    with pytest.raises(BatchEnded) as refused:
        pipeline.restart(rt, rt.jobs.get("b2.0"), Dispatched())
    assert "batch b2, which has ended" in str(refused.value)
    assert rt.jobs.get("b2.0").state == State.FAILED
    assert _counts(rt, "b2") == (0, 1, 1, 1)

    assert batches.finalize(rt, "b2", lambda chain, result: None)
    with pytest.raises(BatchEnded):
        pipeline.restart(rt, rt.jobs.get("b2.0"), Dispatched())
    assert rt.jobs.get("b2.0").state == State.FAILED
    assert rt.jobs.counts()["failed"] == 1


def test_retry_of_an_item_of_a_cancelled_batch_is_refused(rt: Runtime) -> None:
    _batch(rt, "b3", KEYS[:2])
    pipeline.fail(rt, "b3.0", "boom")
    batches.cancel(rt, "b3")
    with pytest.raises(BatchEnded, match="which was cancelled"):
        pipeline.restart(rt, rt.jobs.get("b3.0"), Dispatched())
    assert _counts(rt, "b3") == (0, 1, 1, 2)


def test_a_failure_callback_while_queued_rerequests_at_once(rt: Runtime) -> None:
    """APSIS's failure may arrive before the request task records "requested": it used to
    be dropped, and the job waited the whole APSIS_CALLBACK_TIMEOUT for the watchdog."""
    pipeline.submit(rt, "key@example.com", options=ExportOptions(), job_id="j1")
    sent = Dispatched()
    outcome = pipeline.apply_callback(rt, Callback("1-0", "j1", 1, 500, "boom", 0.0), sent)
    assert outcome == "rerequested"
    job = rt.jobs.get("j1")
    assert (job.state, job.attempt) == (State.QUEUED, 2)
    assert sent == [(pipeline.REQUEST_TASK, ["j1"])]
    # The request task of attempt 1 then records APSIS's 202: a no-op, attempt 2 goes out.
    applied, _ = rt.jobs.transition("j1", State.REQUESTED, attempt=1)
    assert not applied


def test_a_rerequest_never_revives_a_failed_job(rt: Runtime) -> None:
    """A re-request read the job before another process failed it: the job stays failed."""
    _batch(rt, "b4", KEYS[:2])
    rt.jobs.transition("b4.0", State.REQUESTED)
    seen = rt.jobs.get("b4.0")
    pipeline.fail(rt, "b4.0", "not done within EXPORT_DEADLINE")
    assert not pipeline.rerequest(rt, seen, "no ready callback", Dispatched())
    assert rt.jobs.get("b4.0").state == State.FAILED
    assert _counts(rt, "b4") == (0, 1, 1, 2)
