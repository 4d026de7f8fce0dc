"""A worker's main process never does storage I/O (obstore's runtime does not survive fork):
the storage guard, failures and retention handed to the pool as tasks, and the lease that
lapses when a step stops making progress."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fakeredis
import pytest
from job_support import FakeApsis, export_body, make_runtime, run_job

from worker.deliverable import manifest
from worker.deliverable.storage import (
    Storage,
    allow_io_in_this_process,
    forbid_io_in_this_process,
    io_allowed_here,
)
from worker.errors import StorageError
from worker.flow import pipeline, retention, watchdog
from worker.flow.runtime import Runtime
from worker.model.inbox import EVENTS_STREAM
from worker.model.jobs import ExportOptions, State
from worker.model.lease import LEASE_SECONDS, JobLease

T0 = 1_700_000_000.0
DAY = 86_400


@pytest.fixture
def main_process() -> Iterator[None]:
    """This test process plays a Celery main process (pool children are forked from it)."""
    forbid_io_in_this_process()
    try:
        yield
    finally:
        allow_io_in_this_process()


class Sent:
    def __init__(self) -> None:
        self.tasks: list[tuple[str, list[Any]]] = []

    def __call__(self, name: str, args: list[Any]) -> None:
        self.tasks.append((name, args))


def _new_job(rt: Runtime, job_id: str) -> None:
    rt.jobs.create(
        job_id,
        export_key="zoe@example.com",
        account=rt.settings.APSIS_ACCOUNT,
        options=ExportOptions(),
        deadline_seconds=3600,
    )
    rt.jobs.transition(job_id, State.REQUESTED)


# -- the guard ---------------------------------------------------------------------------


def test_storage_io_in_a_main_process_is_refused_loudly_not_hung(
    main_process: None, caplog: pytest.LogCaptureFixture
) -> None:
    storage = Storage("memory:///")  # opening a store is fine: no I/O
    with caplog.at_level(logging.ERROR, logger="apsis.storage"), pytest.raises(StorageError):
        storage.put_bytes("jobs/j1/manifest.json", b"{}")
    assert [r.__dict__.get("event") for r in caplog.records] == ["storage_io_refused"]
    for call in (
        lambda: storage.exists("k"),
        lambda: storage.list("jobs"),
        lambda: storage.delete_prefix("jobs/j1"),
        lambda: storage.get_bytes("k"),
        storage.check,
    ):
        with pytest.raises(StorageError, match="refused"):
            call()
    assert not storage.usable_here


def test_the_ban_is_not_inherited_by_a_forked_child(main_process: None) -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a pool process may use storage
        os.write(write_end, b"1" if io_allowed_here() else b"0")
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    assert answer == b"1"
    assert not io_allowed_here()


# -- failures ------------------------------------------------------------------------------


def test_a_job_failed_in_the_main_process_gets_its_manifest_from_the_pool(
    main_process: None,
) -> None:
    storage = Storage("memory:///")
    rt = make_runtime(storage)
    sent = Sent()
    rt.dispatch = sent
    _new_job(rt, "j1")

    assert pipeline.fail(rt, "j1", "APSIS reported failure code 410")

    assert rt.jobs.get("j1").state == State.FAILED
    assert sent.tasks == [(pipeline.RECORD_FAILURE_TASK, ["j1"])]
    assert rt.redis.xlen(EVENTS_STREAM) == 0  # announced once the manifest is there

    # The pool process runs the task.
    allow_io_in_this_process()
    pipeline.record_failure(rt, "j1")
    body = json.loads(storage.get_bytes(manifest.manifest_object("j1")))
    assert body["state"] == "failed"
    assert "410" in json.dumps(body)
    assert rt.redis.xlen(EVENTS_STREAM) == 1


def test_a_failure_outside_a_main_process_is_recorded_at_once() -> None:
    storage = Storage("memory:///")
    rt = make_runtime(storage)
    sent = Sent()
    rt.dispatch = sent
    _new_job(rt, "j2")
    assert pipeline.fail(rt, "j2", "gave up")
    assert sent.tasks == []
    assert json.loads(storage.get_bytes(manifest.manifest_object("j2")))["state"] == "failed"


def test_recording_the_failure_of_a_job_restarted_since_does_nothing() -> None:
    storage = Storage("memory:///")
    rt = make_runtime(storage)
    _new_job(rt, "j3")
    rt.dispatch = Sent()
    forbid_io_in_this_process()
    try:
        pipeline.fail(rt, "j3", "gave up")
    finally:
        allow_io_in_this_process()
    pipeline.restart(rt, rt.jobs.get("j3"), Sent())
    pipeline.record_failure(rt, "j3")
    assert not storage.exists(manifest.manifest_object("j3"))


# -- retention ---------------------------------------------------------------------------


def _finished_long_ago(rt: Runtime, job_id: str) -> None:
    run_job(rt, job_id, now=T0)
    rt.jobs.mark_chain_dispatched(job_id)
    rt.redis.zadd(rt.jobs.finished_key, {rt.jobs.key(job_id): T0})


def test_the_main_process_sweep_hands_retention_to_the_pool() -> None:
    storage = Storage("memory:///")
    rt = make_runtime(storage, RETENTION_DAYS=30)
    _finished_long_ago(rt, "old")
    later = T0 + 31 * DAY
    sent = Sent()

    forbid_io_in_this_process()
    try:
        report = watchdog.sweep(rt, sent, lambda c, r: None, now=later)
    finally:
        allow_io_in_this_process()

    assert report.deleted == []
    assert sent.tasks == [(retention.RETENTION_TASK, [])]
    assert storage.exists(manifest.manifest_object("old"))
    # The pool process runs the task.
    assert retention.sweep_alone(rt, now=later) == ["old"]
    assert storage.exists(retention.deletion_object("old"))
    assert not storage.exists(manifest.manifest_object("old"))


def test_nothing_due_nothing_dispatched(main_process: None) -> None:
    rt = make_runtime(Storage("memory:///"), RETENTION_DAYS=30)
    sent = Sent()
    watchdog.sweep(rt, sent, lambda c, r: None, now=T0)
    assert sent.tasks == []


def test_one_retention_sweep_at_a_time() -> None:
    storage = Storage("memory:///")
    rt = make_runtime(storage, RETENTION_DAYS=30)
    _finished_long_ago(rt, "old")
    with JobLease(rt.redis, "sweep", prefix="apsis:retention"):
        assert retention.sweep_alone(rt, now=T0 + 31 * DAY) == []
    assert storage.exists(manifest.manifest_object("old"))


# -- a lease that proves progress -----------------------------------------------------------


def test_a_lease_lapses_when_its_step_makes_no_progress() -> None:
    client = fakeredis.FakeRedis()
    lease = JobLease(client, "j4", stall_after=60)
    with lease:
        start = time.monotonic()
        client.pexpire("apsis:lease:j4", 1000)  # nearly lapsed: a beat must renew it
        assert lease.beat_once(start + 59)
        assert client.pttl("apsis:lease:j4") > 1000
        assert not lease.stalled

        client.pexpire("apsis:lease:j4", 1000)
        assert not lease.beat_once(start + 61)  # a minute without progress: hung
        assert lease.stalled
        assert client.pttl("apsis:lease:j4") <= 1000  # left to lapse

        lease.progress()  # it moved after all: renewed again (if still ours)
        assert lease.beat_once(time.monotonic())
        assert not lease.stalled
        assert client.pttl("apsis:lease:j4") > (LEASE_SECONDS - 1) * 1000


def test_a_lease_without_stall_after_only_proves_life() -> None:
    client = fakeredis.FakeRedis()
    lease = JobLease(client, "j5")
    with lease:
        assert lease.beat_once(time.monotonic() + 10 * 3600)


def test_a_fetch_reports_progress_while_downloading_and_uploading(tmp_path: Path) -> None:
    rt = make_runtime(Storage("memory:///"))
    _new_job(rt, "j6")
    rt.jobs.transition("j6", State.READY, fields={"download_url": "https://x/y"})
    body = export_body(merged=["a@example.com", "b@example.com"])
    rt._clients[rt.settings.APSIS_ACCOUNT] = FakeApsis(body)
    calls: list[str] = []

    def progress() -> None:
        calls.append(rt.jobs.get("j6").state.value)

    pipeline._fetch_and_store(rt, rt.jobs.get("j6"), tmp_path, Sent(), progress)

    assert rt.jobs.get("j6").state == State.DONE
    # The download's write, then the steps and every upload (export file, 3 profiles).
    assert len(calls) >= 1 + 2 + 4 + 3


# -- the worker turns the guard on -----------------------------------------------------------


@pytest.mark.parametrize(("pool", "forbidden"), [("prefork", True), ("solo", False)])
def test_a_worker_main_process_forbids_storage_io_when_it_forks_its_pool(
    monkeypatch: pytest.MonkeyPatch, pool: str, forbidden: bool
) -> None:
    """Prefork: tasks run in forked children, so the main process must never use storage.
    Solo: tasks run in the main process itself, which must keep storage."""
    from celery.concurrency import prefork, solo

    monkeypatch.setenv("CALLBACK_SECRET", "x" * 16 + "abcdefghijklmnopqrstuvwxyz")
    monkeypatch.setenv("APSIS_INBOX_CONSUMER", "0")  # no consumer thread: only the guard
    from worker.queue.app import InboxStep

    parent = SimpleNamespace(
        pool=prefork.TaskPool(limit=1) if pool == "prefork" else solo.TaskPool()
    )
    step = InboxStep(parent)
    try:
        step.start(parent)
        assert io_allowed_here() is not forbidden
    finally:
        allow_io_in_this_process()
