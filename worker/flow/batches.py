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

from worker.deliverable import csv_cells
from worker.deliverable.manifest import product_version
from worker.errors import InputError, JobIdConflict
from worker.flow.batch_file import BatchItem
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
    "merged_keys_found",
    "bytes",
    "job_id",
]

DispatchLater = Callable[[str, list[Any], float], None]


def summary_object(batch_id: str) -> str:
    return f"batches/{batch_id}/summary.csv"


def manifest_object(batch_id: str) -> str:
    return f"batches/{batch_id}/manifest.json"


# KEYS: the batch. ARGV: its purpose digest, the same under the previous secret. Claims the
# batch id (state "creating") unless it exists: 1 if claimed, 0 if it exists for the same
# purpose (an idempotent repeat), -1 if for another purpose (refused).
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  local stored = redis.call('HGET', KEYS[1], 'purpose')
  -- A batch from before purposes were kept is taken as the same one (as it always was).
  if not stored or stored == ARGV[1] or stored == ARGV[2] then return 0 end
  return -1
end
redis.call('HSET', KEYS[1], 'state', 'creating', 'purpose', ARGV[1])
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
    claimed = int(rt.redis.eval(_CLAIM, 1, key, digests[0], digests[-1]))
    if claimed < 0:
        log.info("batch id refused: it exists for another batch", extra={"batch_id": batch_id})
        raise JobIdConflict(
            f"batch id {batch_id} is already used for a different batch "
            "(other export keys, options or account); choose a new batch id"
        )
    if not claimed:
        return False
    pipe = rt.redis.pipeline(transaction=True)
    pipe.delete(
        items_key(batch_id), index_key(batch_id), linked_key(batch_id), refused_key(batch_id)
    )
    for start in range(0, len(items), 1000):
        chunk = items[start : start + 1000]
        pipe.rpush(items_key(batch_id), *[json.dumps([i.export_key, i.reference]) for i in chunk])
    # export key -> first index: a merged key found in a job's file is looked up in O(1).
    positions: dict[str, int] = {}
    for n, item in enumerate(items):
        positions.setdefault(item.export_key, n)
    keys = list(positions.items())
    for start in range(0, len(keys), 1000):
        pipe.hset(index_key(batch_id), mapping=dict(keys[start : start + 1000]))
    fields: dict[str, str] = {
        "batch_id": batch_id,
        "total": str(len(items)),
        "submitted": "0",
        "done": "0",
        "failed": "0",
        "created_at": repr(time.time()),
        "account": account,
        "options": json.dumps(options.to_json()),
        "reference": reference or "",
        "max_in_flight": str(max_in_flight),
        "chain": json.dumps(chain) if chain else "",
        "state": "running",  # last: the batch is visible as running only once complete
    }
    pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
    pipe.zadd(RUNNING_KEY, {batch_id: time.time()})
    pipe.execute()
    log.info("batch created", extra={"batch_id": batch_id, "profiles": len(items)})
    return True


def cancel(rt: Runtime, batch_id: str) -> bool:
    """Stop new requests now; jobs already with APSIS finish. True if it was running."""
    batch = rt.batches.get(batch_id)
    if batch.state != "running":
        return False
    rt.redis.hset(batch_key(batch_id), "state", "cancelled")
    rt.redis.zrem(RUNNING_KEY, batch_id)
    log.warning("batch cancelled", extra={"batch_id": batch_id})
    return True


def finalize(
    rt: Runtime,
    batch_id: str,
    send_chain: Callable[[dict[str, Any], dict[str, Any]], None],
) -> bool:
    """Write summary.csv, then the batch manifest (last), announce it, resume its chain.

    Idempotent: a re-run rewrites the same objects; the chain is sent once.
    """
    batch = rt.batches.get(batch_id)
    if batch.is_final or not batch.complete:
        return False
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
    if not rt.redis.hsetnx(batch_key(batch_id), "finished_at", repr(finished)):
        return False  # another copy finished it first
    rt.redis.hset(
        batch_key(batch_id),
        mapping={"state": final_state, "manifest": location},
    )
    rt.redis.zrem(RUNNING_KEY, batch_id)
    rt.redis.zadd("apsis:batches:finished", {batch_id: finished})  # retention's index
    result = {"batch_id": batch_id, "state": final_state, "manifest": location, **counts}
    rt.inbox.announce({"type": "batch", **{k: str(v) for k, v in result.items()}})
    if batch.chain:
        send_chain(batch.chain, result)
    metrics.batch_ended(final_state)
    log.info("batch finished", extra={"batch_id": batch_id, "state": final_state})
    return True


def _summary_row(rt: Runtime, batch: Batch, index: int) -> list[str]:
    refused = rt.batches.refusal(batch.batch_id, index)
    if refused is not None:  # the record under its job id is not this batch's: not read
        raw = rt.redis.lindex(items_key(batch.batch_id), index)
        export_key, reference = json.loads(raw) if raw else ("", None)
        return [export_key, reference or "", "failed", refused, "", "", "", ""]
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
            "",
            "",
            by.job_id if by else "",
        ]
    if job is None:
        raw = rt.redis.lindex(items_key(batch.batch_id), index)
        export_key, reference = json.loads(raw) if raw else ("", None)
        return [export_key, reference or "", "cancelled", "batch cancelled", "", "", "", ""]
    merged = json.loads(job.extra.get("merged_keys", "[]") or "[]")
    return [
        job.export_key,
        job.reference or "",
        job.state.value if job.state in (State.DONE, State.FAILED) else "cancelled",
        job.error or "",
        job.manifest or "",
        ";".join(csv_cells.neutralise(key) for key in merged),
        str(job.source_bytes or ""),
        job.job_id,
    ]
