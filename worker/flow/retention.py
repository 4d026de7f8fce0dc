"""Storage limitation: ended jobs (and batches) older than RETENTION_DAYS are deleted by the
watchdog's sweep, objects and Redis records alike, leaving a deletion record in storage.

The deletion record names the job, its reference and every object deleted, never the export
key. Each step is idempotent: a sweep that dies half-way is finished by the next one.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from worker.deliverable import manifest
from worker.errors import StorageError
from worker.flow import delivery
from worker.flow.runtime import Runtime
from worker.model import batch_store
from worker.model.jobs import State
from worker.model.lease import JobLease, LeaseBusy

log = logging.getLogger("apsis.retention")

#: Jobs (and batches) deleted per sweep at most; the next sweep takes the rest.
RETENTION_BATCH = 200
#: Seconds in a day (RETENTION_DAYS is in days).
DAY_SECONDS = 86_400
#: Batches by finish time (written by batches.finalize).
FINISHED_BATCHES_KEY = "apsis:batches:finished"
#: The task a worker's main process dispatches instead of sweeping (it does no storage I/O).
RETENTION_TASK = "apsis.retention_sweep"


def deletion_object(job_id: str) -> str:
    return f"deletions/{job_id}.json"


def batch_deletion_object(batch_id: str) -> str:
    return f"deletions/batches/{batch_id}.json"


def _iso(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


def due(rt: Runtime, *, now: float | None = None) -> bool:
    """Whether a sweep has anything to delete (Redis only: no storage I/O)."""
    if delivery.deliveries_due(rt, now=now):
        return True  # decrypted package copies whose links expired go, whatever the days
    days = rt.settings.RETENTION_DAYS
    if days <= 0:
        return False
    cutoff = (time.time() if now is None else now) - days * DAY_SECONDS
    if rt.jobs.finished_before(cutoff, limit=1):
        return True
    return bool(rt.redis.zrangebyscore(FINISHED_BATCHES_KEY, "-inf", cutoff, start=0, num=1))


def sweep_alone(rt: Runtime, *, now: float | None = None) -> list[str]:
    """``sweep``, unless another process is sweeping already (then nothing): two sweeps at
    once could write a deletion record that misses what the other one deleted."""
    try:
        with JobLease(rt.redis, "sweep", prefix="apsis:retention"):
            return sweep(rt, now=now)
    except LeaseBusy:
        return []


def sweep(rt: Runtime, *, now: float | None = None) -> list[str]:
    """Delete what ended more than RETENTION_DAYS ago; return the ids deleted (0 = off).
    Decrypted package copies whose links expired are deleted in every case."""
    now = time.time() if now is None else now
    try:
        delivery.sweep_deliveries(rt, now=now)
    except StorageError as exc:
        log.error("retention: could not delete a delivery copy", extra={"reason": str(exc)})
    days = rt.settings.RETENTION_DAYS
    if days <= 0:
        return []
    cutoff = now - days * DAY_SECONDS
    deleted: list[str] = []
    for job_id in rt.jobs.finished_before(cutoff, limit=RETENTION_BATCH):
        try:
            if delete_job(rt, job_id, now=now, reason=f"retention period of {days:g} days"):
                deleted.append(job_id)
        except StorageError as exc:
            log.error("retention: could not delete", extra={"job_id": job_id, "reason": str(exc)})
    raw: list[bytes] = rt.redis.zrangebyscore(  # type: ignore[assignment]
        FINISHED_BATCHES_KEY, "-inf", cutoff, start=0, num=RETENTION_BATCH
    )
    for item in raw:
        batch_id = item.decode()
        try:
            delete_batch(rt, batch_id, now=now, reason=f"retention period of {days:g} days")
            deleted.append(batch_id)
        except StorageError as exc:
            log.error(
                "retention: could not delete", extra={"batch_id": batch_id, "reason": str(exc)}
            )
    # The events stream names jobs and batches too: it keeps nothing older than they may.
    rt.inbox.forget_events_before(cutoff)
    return deleted


def delete_job(rt: Runtime, job_id: str, *, now: float, reason: str) -> bool:
    """Delete an ended job's objects and record, leaving ``deletions/<job_id>.json``."""
    job = rt.jobs.find(job_id)
    if job is None or not job.is_final:
        rt.jobs.delete(job_id)  # only forgets a stale index entry
        return False
    if job.state == State.DONE and not job.chain_dispatched:
        return False  # the caller's chain has not run yet: it may read the objects
    prefix = manifest.job_prefix(job_id)
    # The listing is kept in the record before anything is deleted, so a sweep that dies
    # between the deletes and the deletion record still records every object.
    earlier: list[str] = json.loads(job.extra.get("deleting") or "[]")
    # The package's decrypted delivery copies (deliveries/<job_id>/) go with the job.
    stored = rt.storage.list(prefix) + rt.storage.list(delivery.delivery_prefix(job_id))
    objects = sorted(set(earlier) | set(stored))
    rt.jobs.update(job_id, {"deleting": objects})
    rt.storage.delete_prefix(prefix)
    delivery.delete_job_deliveries(rt, job_id)
    record: dict[str, Any] = {
        "kind": "job",
        "job_id": job_id,
        "reference": job.reference,
        "batch_id": job.batch_id,
        "state": job.state.value,
        "created_at": _iso(job.created_at),
        "ended_at": _iso(job.updated_at),
        "deleted_at": _iso(now),
        "reason": reason,
        "deleted": {
            "objects": objects,
            "object_count": len(objects),
            "redis": [rt.jobs.key(job_id), rt.jobs.history_key(job_id)],
        },
    }
    rt.storage.put_bytes(deletion_object(job_id), json.dumps(record, indent=2).encode())
    rt.jobs.delete(job_id)
    log.warning("retention: job deleted", extra={"job_id": job_id, "event": "deleted"})
    return True


def delete_batch(rt: Runtime, batch_id: str, *, now: float, reason: str) -> None:
    """Delete a finished batch's objects (summary.csv names every export key) and records."""

    key = batch_store.batch_key(batch_id)
    raw = {k.decode(): v.decode() for k, v in rt.redis.hgetall(key).items()}  # type: ignore[union-attr]
    prefix = f"batches/{batch_id}"
    earlier: list[str] = json.loads(raw.get("deleting") or "[]")
    objects = sorted(set(earlier) | set(rt.storage.list(prefix)))
    if raw:
        rt.redis.hset(key, "deleting", json.dumps(objects))
    rt.storage.delete_prefix(prefix)
    redis_keys = [
        key,
        batch_store.items_key(batch_id),
        batch_store.index_key(batch_id),
        batch_store.linked_key(batch_id),
        batch_store.refused_key(batch_id),
    ]
    record = {
        "kind": "batch",
        "batch_id": batch_id,
        "reference": raw.get("reference") or None,
        "state": raw.get("state"),
        "ended_at": _iso(float(raw["finished_at"])) if raw.get("finished_at") else None,
        "deleted_at": _iso(now),
        "reason": reason,
        "deleted": {"objects": objects, "object_count": len(objects), "redis": redis_keys},
    }
    rt.storage.put_bytes(batch_deletion_object(batch_id), json.dumps(record, indent=2).encode())
    pipe = rt.redis.pipeline(transaction=True)
    pipe.delete(*redis_keys)
    pipe.zrem(FINISHED_BATCHES_KEY, batch_id)
    pipe.execute()
    log.warning("retention: batch deleted", extra={"batch_id": batch_id, "event": "deleted"})
