"""Batches: thousands of exports fed to APSIS at the pace its quota allows, then summarised.

A batch is a Redis hash plus the list of its items (``worker.model.batch_store``). Nothing is
enqueued per item up front: the feeders (``worker.flow.feeder``) create each job and send
its request at a reserved slot. So a batch of 50,000 keeps the broker small, runs at the
quota from a pool of any size, and cancels at once. Here: creating a batch (refusing a
reused id), cancelling it, and finalizing it (summary.csv, then its manifest, last).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from worker.deliverable import csv_cells
from worker.deliverable.manifest import product_version
from worker.errors import InputError, JobIdConflict, JobNotFound, StorageError
from worker.flow import pipeline
from worker.flow.batch_file import BatchItem
from worker.flow.retention import FINISHED_BATCHES_KEY
from worker.flow.runtime import Runtime
from worker.model import ids, purpose
from worker.model.batch_store import (
    RUNNING_KEY,
    Batch,
    batch_key,
    index_key,
    items_key,
    job_id_for,
    linked_key,
    refused_key,
)
from worker.model.jobs import ExportOptions, State
from worker.model.lease import JobLease, LeaseBusy
from worker.telemetry import metrics

log = logging.getLogger("apsis.batch")

#: Default cap on a batch's unfinished jobs (each is a small Redis hash while it waits).
DEFAULT_MAX_IN_FLIGHT = 10_000
SUMMARY_COLUMNS = [
    "export_key",
    "reference",
    "state",
    "reason",
    "manifest",
    "package",
    "merged_keys_found",
    "bytes",
    "job_id",
]

DispatchLater = Callable[[str, list[Any], float], None]


def summary_object(batch_id: str) -> str:
    return f"batches/{batch_id}/summary.csv"


def manifest_object(batch_id: str) -> str:
    return f"batches/{batch_id}/manifest.json"


# KEYS: the batch, its items, index, linked and refused keys, the running set. ARGV: the
# purpose digest, the same under the previous secret, the time, the number of field pairs,
# the field pairs, the number of items, the items, then (export key, first index) pairs.
# Creates the whole batch in one step, so no reader ever sees part of it: 1 if created (or
# an unfinished creation of the same batch, left "creating" by an earlier version, was
# finished), 0 if it exists for the same purpose (an idempotent repeat), -1 if it exists for
# another purpose (refused).
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  local stored = redis.call('HGET', KEYS[1], 'purpose')
  -- A batch from before purposes were kept is taken as the same one (as it always was).
  if stored and stored ~= ARGV[1] and stored ~= ARGV[2] then return -1 end
  if redis.call('HGET', KEYS[1], 'state') ~= 'creating' then return 0 end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
local n = 4
local fields = tonumber(ARGV[n])
for i = n + 1, n + 2 * fields, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
n = n + 2 * fields + 1
local count = tonumber(ARGV[n])
for i = n + 1, n + count, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 999, n + count)))
end
for i = n + count + 1, #ARGV, 1000 do
  redis.call('HSET', KEYS[3], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('HSET', KEYS[1], 'purpose', ARGV[1], 'state', 'running')
redis.call('ZADD', KEYS[6], ARGV[3], redis.call('HGET', KEYS[1], 'batch_id'))
return 1
"""


def create(
    rt: Runtime,
    batch_id: str,
    items: list[BatchItem],
    *,
    options: ExportOptions,
    reference: str | None = None,
    account: str | None = None,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    chain: dict[str, Any] | None = None,
) -> bool:
    """Record the batch and its items (idempotent on ``batch_id``); True if it is new.

    Raises JobIdConflict if ``batch_id`` exists for other export keys, options or account."""
    ids.validate_batch_id(batch_id)
    if not items:
        raise InputError("the batch has no export keys")
    for item in items:
        ids.validate_export_key(item.export_key)
    account = account or rt.settings.APSIS_ACCOUNT
    rt.settings.account(account)  # an unknown account is refused now, not per job
    key = batch_key(batch_id)
    digests = purpose.batch_digests(
        rt.jobs.secrets,
        export_keys=(i.export_key for i in items),
        options=options.to_json(),
        account=account,
    )
    now = time.time()
    fields: dict[str, str] = {
        "batch_id": batch_id,
        "total": str(len(items)),
        "submitted": "0",
        "done": "0",
        "failed": "0",
        "created_at": repr(now),
        "account": account,
        "options": json.dumps(options.to_json()),
        "reference": reference or "",
        "max_in_flight": str(max_in_flight),
        "chain": json.dumps(chain) if chain else "",
    }
    # export key -> first index: a merged key found in a job's file is looked up in O(1).
    positions: dict[str, int] = {}
    for n, item in enumerate(items):
        positions.setdefault(item.export_key, n)
    args: list[str | int] = [digests[0], digests[-1], repr(now), len(fields)]
    for name, value in fields.items():
        args += [name, value]
    args.append(len(items))
    args += [json.dumps([i.export_key, i.reference]) for i in items]
    for export_key, index in positions.items():
        args += [export_key, index]
    keys = [
        key,
        items_key(batch_id),
        index_key(batch_id),
        linked_key(batch_id),
        refused_key(batch_id),
        RUNNING_KEY,
    ]
    created = int(rt.redis.eval(_CREATE, len(keys), *keys, *args))
    if created < 0:
        log.info("batch id refused: it exists for another batch", extra={"batch_id": batch_id})
        raise JobIdConflict(
            f"batch id {batch_id} is already used for a different batch "
            "(other export keys, options or account); choose a new batch id"
        )
    if not created:
        return False
    log.info("batch created", extra={"batch_id": batch_id, "profiles": len(items)})
    return True


# KEYS: the batch. Running -> cancelled, atomically (never a batch finished meanwhile).
_CANCEL = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'cancelled')
return 1
"""


# KEYS: the batch, retention's index of finished batches. ARGV: the time, the chain's result,
# the final state, the manifest's location, the batch id. Records the end once, in one step:
# 1 if this call did.
_FINISH = """
if redis.call('HSETNX', KEYS[1], 'finished_at', ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'result', ARGV[2], 'state', ARGV[3], 'manifest', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[5])
return 1
"""


def cancel(rt: Runtime, batch_id: str) -> bool:
    """Stop new requests now; jobs already with APSIS finish. True if it was running."""
    rt.batches.get(batch_id)  # JobNotFound if there is no such batch
    if not rt.redis.eval(_CANCEL, 1, batch_key(batch_id)):
        return False
    # It stays in RUNNING_KEY until finalized: the sweep's safety net covers it too.
    log.warning("batch cancelled", extra={"batch_id": batch_id})
    return True


def finalize(
    rt: Runtime,
    batch_id: str,
    send_chain: Callable[[dict[str, Any], dict[str, Any]], None],
) -> bool:
    """Write summary.csv, then the batch manifest (last), announce it, resume its chain.

    True if this call finished the batch. Idempotent: a re-run rewrites the same objects,
    and a batch finished with its chain not yet sent gets it sent. One finalizer at a time
    (a lease); storage errors propagate, for the task to retry (and, once it gives up, for
    the sweep to dispatch it again).

    The chain is sent at least once: it is marked sent only after sending, so a process that
    dies between the two makes the next run send it again. A rare duplicate is the lesser
    evil: a lost chain is a caller that never hears of its batch, and a caller's chained
    task must bear a redelivery anyway (Celery's acks_late gives it the same guarantee).
    """
    try:
        with JobLease(rt.redis, batch_id, prefix="apsis:finalize"):
            return _finalize(rt, batch_id, send_chain)
    except LeaseBusy:
        return False  # another copy is at it; if it dies, the sweep dispatches it again


def finalize_or_retry(
    rt: Runtime,
    batch_id: str,
    send_chain: Callable[[dict[str, Any], dict[str, Any]], None],
    *,
    retries: int,
) -> bool:
    """``finalize``, for the task: a failure (a storage error, say) raises RetryLater with an
    exponential backoff until BATCH_FINALIZE_RETRIES retries are spent; then the batch is
    left to the sweep, which dispatches its finalize again every WATCHDOG_STUCK_AFTER.

    Redis being unreachable propagates (the task puts its message back)."""
    try:
        return finalize(rt, batch_id, send_chain)
    except (redis.ConnectionError, redis.TimeoutError, JobNotFound):
        raise
    except Exception as exc:
        # A storage error names an object (batches/<id>/...); anything else only its type.
        reason = f"storage: {exc}" if isinstance(exc, StorageError) else type(exc).__name__
        extra = {"batch_id": batch_id, "reason": reason, "attempt": retries + 1}
        if retries < rt.settings.BATCH_FINALIZE_RETRIES:
            delay = pipeline.backoff(retries)
            log.warning("batch finalize failed; retrying", extra={**extra, "retry_in": delay})
            metrics.retry_scheduled()
            raise pipeline.RetryLater(delay, reason) from None
        log.error("batch finalize failed; retries spent, left to the sweep", extra=extra)
        return False


def _finalize(
    rt: Runtime,
    batch_id: str,
    send_chain: Callable[[dict[str, Any], dict[str, Any]], None],
) -> bool:
    batch = rt.batches.get(batch_id)
    if not batch.needs_finalize:
        if batch.is_final:
            rt.batches.forget_running(batch_id)
        return False
    finished_now = False
    if not batch.is_final:
        finished_now = _finish(rt, batch)
        batch = rt.batches.get(batch_id)
    if batch.chain and not batch.chain_sent and batch.result is not None:
        send_chain(batch.chain, batch.result)
    rt.batches.mark_chain_sent(batch_id)  # and out of RUNNING_KEY: nothing is left to do
    if rt.batches.rescued(batch_id):
        metrics.batch_rescued()
        log.warning(
            "batch finalized by the safety net",
            extra={"batch_id": batch_id, "event": "batch_rescued", "state": batch.state},
        )
    return finished_now


def _finish(rt: Runtime, batch: Batch) -> bool:
    """Summary, manifest (the commit point), then the record; False if another finished it."""
    batch_id = batch.batch_id
    counts = {"done": 0, "failed": 0, "cancelled": 0}
    with tempfile.TemporaryDirectory(prefix="apsis-batch-") as tmp:
        summary = Path(tmp) / "summary.csv"
        with summary.open("w", newline="", encoding="utf-8") as out:
            writer = csv_cells.writer(out)
            writer.writerow(SUMMARY_COLUMNS)
            for index in range(batch.total):
                row = _summary_row(rt, batch, index)
                counts[row[2]] = counts.get(row[2], 0) + 1
                writer.writerow(row)
        digest = hashlib.sha256(summary.read_bytes()).hexdigest()
        rt.storage.put_file(summary_object(batch_id), summary, content_type="text/csv")
    finished = time.time()
    final_state = "done" if batch.state == "running" else "cancelled"
    body = {
        "batch_id": batch_id,
        "reference": batch.reference,
        "account": batch.account,
        "state": final_state,
        "options": batch.options.to_json(),
        "created_at": batch.created_at,
        "finished_at": finished,
        "total": batch.total,
        "counts": counts,
        "summary": {"object": summary_object(batch_id), "sha256": digest},
        "jobs_prefix": "jobs/",
        "product_version": product_version(),
    }
    encoded = json.dumps(body, indent=2).encode()
    rt.redis.hset(batch_key(batch_id), "manifest_sha256", hashlib.sha256(encoded).hexdigest())
    rt.storage.put_bytes(manifest_object(batch_id), encoded)  # the commit point
    location = rt.storage.location(manifest_object(batch_id))
    result = {"batch_id": batch_id, "state": final_state, "manifest": location, **counts}
    keys = [batch_key(batch_id), FINISHED_BATCHES_KEY]  # retention's index
    args = [repr(finished), json.dumps(result), final_state, location, batch_id]
    if not rt.redis.eval(_FINISH, len(keys), *keys, *args):
        return False  # another copy finished it first
    rt.inbox.announce({"type": "batch", **{k: str(v) for k, v in result.items()}})
    metrics.batch_ended(final_state)
    log.info("batch finished", extra={"batch_id": batch_id, "state": final_state})
    return True


def _summary_row(rt: Runtime, batch: Batch, index: int) -> list[str]:
    refused = rt.batches.refusal(batch.batch_id, index)
    if refused is not None:  # the record under its job id is not this batch's: not read
        raw = rt.redis.lindex(items_key(batch.batch_id), index)
        export_key, reference = json.loads(raw) if raw else ("", None)
        return [export_key, reference or "", "failed", refused, "", "", "", "", ""]
    job = rt.jobs.find(job_id_for(batch.batch_id, index)) if index < batch.submitted else None
    covering = rt.redis.hget(linked_key(batch.batch_id), str(index))
    if job is None and covering is not None:
        raw = rt.redis.lindex(items_key(batch.batch_id), index)
        export_key, reference = json.loads(raw) if raw else ("", None)
        by = rt.jobs.find(covering.decode())  # type: ignore[union-attr]
        reason = f"exported as a merged profile of job {covering.decode()}"  # type: ignore[union-attr]
        manifest = by.manifest if by else ""
        return [
            export_key,
            reference or "",
            "linked",
            reason,
            manifest or "",
            (by.extra.get("package") or "") if by else "",
            "",
            "",
            by.job_id if by else "",
        ]
    if job is None:
        raw = rt.redis.lindex(items_key(batch.batch_id), index)
        export_key, reference = json.loads(raw) if raw else ("", None)
        return [export_key, reference or "", "cancelled", "batch cancelled", "", "", "", "", ""]
    merged = json.loads(job.extra.get("merged_keys", "[]") or "[]")
    return [
        job.export_key,
        job.reference or "",
        job.state.value if job.state in (State.DONE, State.FAILED) else "cancelled",
        job.error or "",
        job.manifest or "",
        # The package's object name (jobs/<job_id>/package.zip): `apsis-export link` signs it.
        job.extra.get("package") or "",
        ";".join(csv_cells.neutralise(key) for key in merged),
        str(job.source_bytes or ""),
        job.job_id,
    ]
