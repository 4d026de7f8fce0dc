"""Storage work a worker's main process hands to its pool (it does no storage I/O itself:
obstore's runtime does not survive fork, see ``worker.deliverable.storage``)."""

from __future__ import annotations

from celery import shared_task

from tasks.export import requeue_when_redis_is_down
from worker.flow import pipeline, retention
from worker.flow.runtime import get_runtime


@shared_task(name=pipeline.RECORD_FAILURE_TASK)
@requeue_when_redis_is_down
def record_failure(job_id: str) -> None:
    """A job failed in the main process: its failure manifest, event and batch bookkeeping."""
    pipeline.record_failure(get_runtime(), job_id)


@shared_task(name=retention.RETENTION_TASK)
@requeue_when_redis_is_down
def retention_sweep() -> None:
    """Delete what ended more than RETENTION_DAYS ago (one sweep at a time in the pool)."""
    retention.sweep_alone(get_runtime())
