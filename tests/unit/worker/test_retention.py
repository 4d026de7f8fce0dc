"""worker/flow/retention.py: ended jobs deleted after RETENTION_DAYS by the sweep (fake clock)."""

from __future__ import annotations

import json
import time
from typing import Any

from job_support import make_runtime, run_job

from worker.flow import pipeline, retention, watchdog
from worker.flow.runtime import Runtime
from worker.model.inbox import EVENTS_STREAM
from worker.model.jobs import State

T0 = 1_700_000_000.0
DAY = 86_400


def _sweep(rt: Runtime, now: float) -> watchdog.SweepReport:
    return watchdog.sweep(rt, lambda name, args: None, lambda c, r: None, now=now)


def _finish(rt: Runtime, job_id: str) -> None:
    run_job(rt, job_id, now=T0)
    rt.jobs.mark_chain_dispatched(job_id)
    # The DONE transition used the real clock: put it at T0 on the fake one.
    rt.redis.zadd(rt.jobs.finished_key, {rt.jobs.key(job_id): T0})


def test_a_job_is_kept_until_its_retention_period_ends_then_deleted_with_a_record() -> None:
    rt = make_runtime(RETENTION_DAYS=30)
    _finish(rt, "old")
    objects = rt.storage.list("jobs/old")
    assert "jobs/old/manifest.json" in objects
    assert rt.jobs.counts()["done"] == 1

    assert _sweep(rt, T0 + 30 * DAY - 1).deleted == []
    assert rt.jobs.exists("old") and rt.storage.list("jobs/old") == objects

    assert _sweep(rt, T0 + 30 * DAY + 1).deleted == ["old"]
    assert not rt.jobs.exists("old")
    assert rt.storage.list("jobs/old") == []
    assert rt.redis.exists(rt.jobs.history_key("old")) == 0
    assert rt.jobs.counts()["done"] == 0  # the counts stay true
    record = json.loads(rt.storage.get_bytes("deletions/old.json"))
    assert record["job_id"] == "old"
    assert record["deleted"]["objects"] == objects
    assert record["deleted"]["object_count"] == len(objects)
    assert record["deleted_at"].startswith("2023-12-")
    assert "zoe" not in json.dumps(record)  # never the export key
    # A second sweep has nothing left to do.
    assert _sweep(rt, T0 + 31 * DAY).deleted == []


def test_retention_zero_keeps_everything() -> None:
    rt = make_runtime(RETENTION_DAYS=0)
    _finish(rt, "kept")
    assert _sweep(rt, T0 + 3650 * DAY).deleted == []
    assert rt.jobs.exists("kept")


def test_a_failed_job_restarted_before_the_sweep_is_not_deleted() -> None:
    rt = make_runtime(RETENTION_DAYS=1)
    _finish(rt, "again")
    rt.jobs.transition("again", State.FAILED, allowed_from=(State.DONE,), now=T0)
    rt.jobs.transition("again", State.QUEUED, allowed_from=(State.FAILED,), now=T0)
    assert retention.sweep(rt, now=T0 + 5 * DAY) == []
    assert rt.jobs.get("again").state == State.QUEUED


def test_a_sweep_that_died_after_deleting_objects_still_records_them() -> None:
    rt = make_runtime(RETENTION_DAYS=1)
    _finish(rt, "half")
    objects = rt.storage.list("jobs/half")
    rt.jobs.update("half", {"deleting": objects})
    rt.storage.delete_prefix("jobs/half")  # as if the process died right here
    assert retention.sweep(rt, now=T0 + 2 * DAY) == ["half"]
    record = json.loads(rt.storage.get_bytes("deletions/half.json"))
    assert record["deleted"]["objects"] == objects


def test_the_events_stream_forgets_the_jobs_retention_deleted() -> None:
    rt = make_runtime(RETENTION_DAYS=30)

    def finish(job_id: str) -> None:
        run_job(rt, job_id)
        # Resuming the caller's chain announces the job on the events stream (real clock).
        assert pipeline.resume_caller_chain(rt, job_id, lambda chain, result: None)

    finish("old")
    time.sleep(0.005)
    between = time.time()
    time.sleep(0.005)
    finish("new")

    def named() -> list[str]:
        entries: list[Any] = rt.redis.xrange(EVENTS_STREAM)
        return [fields[b"job_id"].decode() for _id, fields in entries]

    assert named() == ["old", "new"]
    assert _sweep(rt, between + 30 * DAY).deleted == ["old"]
    assert named() == ["new"]  # no event names a job that no longer exists
