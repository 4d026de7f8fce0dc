"""The export's Celery tasks: thin, each a few lines calling into ``worker.flow.pipeline``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import redis
from celery import Task, shared_task
from celery.exceptions import Reject

from worker.errors import InputError
from worker.flow import batches, delivery, pipeline
from worker.flow.batch_file import BatchItem
from worker.flow.runtime import get_runtime
from worker.model.jobs import ExportOptions
from worker.queue.app import send_chain, send_task

P = ParamSpec("P")
R = TypeVar("R")


def requeue_when_redis_is_down(run: Callable[P, R]) -> Callable[P, R]:
    """Put the message back if Redis (the job store) is unreachable.

    A failed task is acknowledged (acks_late acknowledges failures), so without this a
    caller's request that arrives while Redis restarts would be lost. Requeued, it runs again
    once Redis answers; if Redis is still down, the message stays unacknowledged and the
    broker redelivers it after the visibility timeout. Every task here is idempotent.
    """

    @functools.wraps(run)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return run(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise Reject(f"redis unavailable: {type(exc).__name__}", requeue=True) from None

    return guarded


def _detach_caller_chain(task: Task[Any, Any]) -> dict[str, Any] | None:
    """Take the caller's chain and links off this task's request, to be stored with the job
    or batch: they resume when the export is stored (or the whole batch has ended), not when
    this task returns. None: the caller chained nothing."""
    stored = {"chain": task.request.chain or [], "link": task.request.callbacks or []}
    task.request.chain = None
    task.request.callbacks = None
    return stored if stored["chain"] or stored["link"] else None


@shared_task(name="apsis.export_profile", bind=True)
@requeue_when_redis_is_down
def export_profile(
    self: Task[Any, Any],
    export_key: str,
    *,
    include_attribute_history: bool = False,
    include_type_definitions: bool = False,
    include_merged_profiles: bool = True,
    job_id: str | None = None,
    reference: str | None = None,
    batch_id: str | None = None,
    account: str | None = None,
    urgent: bool = False,
    deliver: str | int | None = None,
) -> dict[str, Any]:
    """Create the job, put its request in the account's dispatch line, park the caller's
    chain, and end. ``urgent``: ahead of every other waiting request of the account.
    ``deliver`` ("7d", "12h", seconds): the result carries a link to the package, valid
    that long (a bearer credential: ask only where the result travels safely)."""
    rt = get_runtime()
    job_id = job_id or pipeline.job_id_from_task_id(self.request.id)
    chain = _detach_caller_chain(self)
    options = ExportOptions(
        include_attribute_history=include_attribute_history,
        include_type_definitions=include_type_definitions,
        include_merged_profiles=include_merged_profiles,
    )
    try:
        link_seconds = delivery.check_link_request(rt, deliver) if deliver else None
        pipeline.submit(
            rt,
            export_key,
            options=options,
            job_id=job_id,
            reference=reference,
            batch_id=batch_id,
            account=account,
            chain=chain,
            urgent=urgent,
        )
    except InputError as exc:
        # A caller's bad input: nothing to retry; the error names no personal data.
        return {"job_id": job_id, "state": "rejected", "error": str(exc)}
    if link_seconds:
        delivery.ask_for_link(rt, job_id, link_seconds)
    placed = pipeline.place_in_line(rt, job_id)
    # The job and its place in line outlive a failover before the message is acknowledged.
    rt.confirm_writes()
    # Placed: it was queued a moment ago (no second read of the job for its state).
    state = "queued" if placed else rt.jobs.get(job_id).state.value
    return {"job_id": job_id, "state": state}


@shared_task(name="apsis.request_export")
@requeue_when_redis_is_down
def request_export(job_id: str) -> None:
    """Put a queued job's (re-)request in its account's dispatch line; the feeders send it
    at a reserved slot. Nothing here waits for the limiter or retries."""
    pipeline.place_in_line(get_runtime(), job_id)


@shared_task(name="apsis.fetch_export")
@requeue_when_redis_is_down
def fetch_export(job_id: str, slot_at: float | None = None) -> None:
    """Download (at ``slot_at``, the slot the download line reserved), split and store a
    ready job; then resume the caller's chain. "Not now" (APSIS 429/5xx, a storage error, a
    missed slot) puts the job back in the download line until its retry is due: no Celery
    retry, so nothing is bounded by Celery's retry default; the job's own retry budget
    (counted on its record) is the only limit."""
    rt = get_runtime()
    try:
        pipeline.fetch_and_store(rt, job_id, send_task, slot_at=slot_at)
    except pipeline.RetryLater as later:
        pipeline.download_later(rt, job_id, later.delay)
        return
    pipeline.resume_caller_chain(rt, job_id, send_chain)


@shared_task(name="apsis.export_batch", bind=True)
@requeue_when_redis_is_down
def export_batch(
    self: Task[Any, Any],
    export_keys: list[Any],
    *,
    include_attribute_history: bool = False,
    include_type_definitions: bool = False,
    include_merged_profiles: bool = True,
    batch_id: str | None = None,
    reference: str | None = None,
    account: str | None = None,
    max_in_flight: int = batches.DEFAULT_MAX_IN_FLIGHT,
) -> dict[str, Any]:
    """Record a batch (keys, or {"export_key", "reference"} objects) and start feeding it."""
    rt = get_runtime()
    batch_id = batch_id or pipeline.job_id_from_task_id(self.request.id)
    chain = _detach_caller_chain(self)
    items = [
        BatchItem(k["export_key"], k.get("reference")) if isinstance(k, dict) else BatchItem(k)
        for k in export_keys
    ]
    options = ExportOptions(
        include_attribute_history=include_attribute_history,
        include_type_definitions=include_type_definitions,
        include_merged_profiles=include_merged_profiles,
    )
    try:
        batches.create(
            rt,
            batch_id,
            items,
            options=options,
            reference=reference,
            account=account,
            max_in_flight=max_in_flight,
            chain=chain,
        )
    except InputError as exc:
        return {"batch_id": batch_id, "state": "rejected", "error": str(exc)}
    rt.confirm_writes()  # the batch outlives a failover before the message is acknowledged
    # The feeder threads of the worker nodes pick the batch up from here.
    return {"batch_id": batch_id, "state": "running"}


# max_retries=None on the task: finalize_or_retry bounds the retries by
# BATCH_FINALIZE_RETRIES (then the sweep takes over), never Celery's default of 3.
@shared_task(name="apsis.finalize_batch", bind=True, max_retries=None)
@requeue_when_redis_is_down
def finalize_batch(self: Task[Any, Any], batch_id: str) -> None:
    """Write the batch's summary and manifest once its last job has ended; then its chain."""
    try:
        batches.finalize_or_retry(get_runtime(), batch_id, send_chain, retries=self.request.retries)
    except pipeline.RetryLater as later:
        raise self.retry(countdown=later.delay) from None
