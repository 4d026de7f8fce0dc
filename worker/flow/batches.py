"""Batches: thousands of exports fed to APSIS at the pace its quota allows, then summarised.

A batch is a Redis hash plus the list of its items. Nothing is enqueued per item up front:
a feeder thread in every worker's main process (no pool slot, so fetches never delay it)
takes a batch's lease, creates each job and sends its request when the pool-wide limiter
grants a slot, up to ``max_in_flight`` unfinished jobs. One feeder per batch at a time; if its
node dies the lease expires and another node's feeder carries on. So a batch of 50,000 keeps
the broker small, runs at the quota from a pool of any size, and cancels at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.deliverable import csv_cells
from worker.deliverable.manifest import product_version
from worker.errors import ConfigError, InputError, JobIdConflict, JobNotFound
from worker.flow import pipeline
from worker.flow.batch_file import BatchItem
from worker.flow.runtime import Runtime
from worker.model import purpose
from worker.model.jobs import ExportOptions, State
from worker.model.lease import JobLease, LeaseBusy
from worker.telemetry import metrics

log = logging.getLogger("apsis.batch")

#: Seconds a feeder works on one batch before looking at the others (fairness).
FEED_SLICE = 10.0
#: Seconds an idle feeder waits before looking for running batches again.
FEED_IDLE = 0.5
#: Seconds the limiter may park the feeder for one slot before it reschedules itself.
FEED_MAX_WAIT = 1.0
#: Threads sending a feeder's requests (so one slow answer does not delay the next send).
SENDERS = 4
#: Seconds between two looks when the batch has max_in_flight unfinished jobs.
FEED_FULL_PAUSE = 2.0
#: Default cap on a batch's unfinished jobs (each is a small Redis hash while it waits).
DEFAULT_MAX_IN_FLIGHT = 10_000
#: Batch ids. Item job ids are ``<batch_id>.<n>``: a caller's job id (no dots) can never
#: take that form, so no caller can create, or be answered with, a batch item's job.
BATCH_ID_PATTERN = re.compile(r"\A[A-Za-z0-9_]{1,48}\Z")
FINALIZE_TASK = "apsis.finalize_batch"
RUNNING_KEY = "apsis:batches:running"
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


def batch_key(batch_id: str) -> str:
    return f"apsis:batch:{batch_id}"


def items_key(batch_id: str) -> str:
    return f"apsis:batch:{batch_id}:items"


def index_key(batch_id: str) -> str:
    """Hash: export key -> the item's index in the batch."""
    return f"apsis:batch:{batch_id}:index"


def linked_key(batch_id: str) -> str:
    """Hash: item index -> the finished job that exported that key as a merged profile."""
    return f"apsis:batch:{batch_id}:linked"


def refused_key(batch_id: str) -> str:
    """Hash: item index -> why the item got no job (its job id was taken by another)."""
    return f"apsis:batch:{batch_id}:refused"


def job_id_for(batch_id: str, index: int) -> str:
    return f"{batch_id}.{index}"


def summary_object(batch_id: str) -> str:
    return f"batches/{batch_id}/summary.csv"


def manifest_object(batch_id: str) -> str:
    return f"batches/{batch_id}/manifest.json"


@dataclass(frozen=True)
class Batch:
    batch_id: str
    state: str  # running, cancelled (no new requests), done, cancelled-done
    total: int
    submitted: int
    done: int
    failed: int
    created_at: float
    account: str
    options: ExportOptions
    reference: str | None
    max_in_flight: int
    manifest: str | None
    finished_at: float | None
    chain: dict[str, Any] | None
    #: Items not exported on their own: a finished job of the batch held them as merged.
    linked: int = 0

    @property
    def ended(self) -> int:
        return self.done + self.failed + self.linked

    @property
    def in_flight(self) -> int:
        return self.submitted - self.ended

    @property
    def waiting(self) -> int:
        return self.total - self.submitted if self.state == "running" else 0

    @property
    def is_final(self) -> bool:
        return self.finished_at is not None


def get(rt: Runtime, batch_id: str) -> Batch:
    raw = rt.redis.hgetall(batch_key(batch_id))
    if not raw:
        raise JobNotFound(f"no batch {batch_id}")
    data = {k.decode(): v.decode() for k, v in raw.items()}  # type: ignore[union-attr]
    return Batch(
        batch_id=batch_id,
        state=data["state"],
        total=int(data["total"]),
        submitted=int(data.get("submitted", 0)),
        done=int(data.get("done", 0)),
        failed=int(data.get("failed", 0)),
        created_at=float(data["created_at"]),
        account=data["account"],
        options=ExportOptions.from_json(json.loads(data["options"])),
        reference=data.get("reference") or None,
        max_in_flight=int(data["max_in_flight"]),
        manifest=data.get("manifest") or None,
        finished_at=float(data["finished_at"]) if data.get("finished_at") else None,
        chain=json.loads(data["chain"]) if data.get("chain") else None,
        linked=int(data.get("linked", 0)),
    )


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

# KEYS: the batch, its refused hash. ARGV: the item's index, the reason. Counts the item as
# submitted and failed, once: 1 the first time, 0 after.
_REFUSE = """
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'submitted', 1)
redis.call('HINCRBY', KEYS[1], 'failed', 1)
return 1
"""


def exists(rt: Runtime, batch_id: str) -> bool:
    return bool(rt.redis.exists(batch_key(batch_id)))


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
    if not BATCH_ID_PATTERN.match(batch_id):
        raise InputError("batch id must be 1-48 characters of A-Z, a-z, 0-9 and _")
    if not items:
        raise InputError("the batch has no export keys")
    for item in items:
        pipeline.validate_export_key(item.export_key)
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


def feed(rt: Runtime, batch_id: str, dispatch_later: DispatchLater) -> float | None:
    """Create and request the batch's next jobs as fast as the limiter allows, for a slice.

    Returns the seconds after which this batch wants feeding again, or None when every item
    has been submitted (or the batch was cancelled, or another feeder holds the lease).
    """
    try:
        with JobLease(rt.redis, f"batch-{batch_id}"):
            return _feed(rt, batch_id, dispatch_later)
    except LeaseBusy:
        return None


def _feed(rt: Runtime, batch_id: str, dispatch_later: DispatchLater) -> float | None:
    # Requests leave from a few sender threads, so one slow APSIS answer never makes the
    # next request late: a late request bunches up with the one a window after it, and
    # APSIS's per-window count would answer that one 429.
    with ThreadPoolExecutor(max_workers=SENDERS, thread_name_prefix="apsis-feed") as senders:
        return _feed_slice(rt, batch_id, dispatch_later, senders)


def _send(rt: Runtime, job_id: str, slot_at: float, dispatch_later: DispatchLater) -> None:
    try:
        pipeline.request(rt, job_id, slot_at=slot_at)  # the slot reserved for this request
    except pipeline.RetryLater as later:
        log.info(
            "batch request rescheduled",
            extra={"job_id": job_id, "reason": later.reason, "retry_in": later.delay},
        )
        dispatch_later(pipeline.REQUEST_TASK, [job_id], later.delay)
    except Exception:
        # The job stays queued; the watchdog dispatches its request task again.
        log.exception("batch request failed", extra={"job_id": job_id})


def _feed_slice(
    rt: Runtime, batch_id: str, dispatch_later: DispatchLater, senders: ThreadPoolExecutor
) -> float | None:
    started = time.monotonic()
    batch = get(rt, batch_id)
    try:
        client = rt.apsis_for(batch.account)
    except ConfigError as exc:
        # Its account was removed from APSIS_ACCOUNTS since: no request can be sent, now or
        # later. Stop it (its sent jobs finish) rather than fail in this thread forever.
        log.error("batch account not configured", extra={"batch_id": batch_id, "reason": str(exc)})
        if cancel(rt, batch_id) and complete(get(rt, batch_id)):
            dispatch_later(FINALIZE_TASK, [batch_id], 0.0)
        return None
    limit = client.limits.export
    # Have a token before the first slot: fetching it inside the first sends would make
    # them late, bunching them with the requests one window later (a 429 from APSIS).
    client.tokens.get()
    while time.monotonic() - started < FEED_SLICE:
        batch = get(rt, batch_id)
        rt.redis.zadd(RUNNING_KEY, {batch_id: time.time()})
        if batch.state != "running" or batch.submitted >= batch.total:
            return None  # stays in RUNNING_KEY until finalized: the watchdog's safety net
        if batch.in_flight >= batch.max_in_flight:
            return FEED_FULL_PAUSE
        # Held as a merged profile by a finished job of the batch: linked, no slot spent.
        if skip_if_linked(rt, batch_id, batch.submitted):
            if complete(get(rt, batch_id)):
                dispatch_later(FINALIZE_TASK, [batch_id], 0.0)
            continue
        # The item's job id is taken by a record this batch did not create: the item fails
        # once, with no slot spent; the other record is never touched nor reported as ours.
        if rt.jobs.exists(job_id_for(batch_id, batch.submitted)):
            refuse_item(rt, batch_id, batch.submitted, dispatch_later)
            continue
        slot = rt.limiter.acquire(batch.account, "export", limit, max_wait=FEED_MAX_WAIT)
        if not slot.granted:
            return slot.wait
        # Prepare the job now and send at the slot's time: Redis work done after the wait
        # would delay some requests more than others and bunch them together at APSIS.
        slot_at = time.monotonic() + slot.wait
        index = batch.submitted
        raw = rt.redis.lindex(items_key(batch_id), index)
        if raw is None:
            return None
        export_key, reference = json.loads(raw)
        job_id = job_id_for(batch_id, index)
        try:
            created = pipeline.submit(
                rt,
                export_key,
                options=batch.options,
                job_id=job_id,
                reference=reference or batch.reference,
                batch_id=batch_id,
                account=batch.account,
            )
        except JobIdConflict:
            created = False
        if not created:  # taken since the look above: this slot goes unused, once
            refuse_item(rt, batch_id, index, dispatch_later)
            continue
        senders.submit(_send, rt, job_id, slot_at, dispatch_later)
        # Do not run ahead of the slot: the next one is reserved only when this one is due.
        time.sleep(max(0.0, slot_at - time.monotonic()))
    return 0.0


def refuse_item(rt: Runtime, batch_id: str, index: int, dispatch_later: DispatchLater) -> None:
    """Count item ``index`` as submitted and failed, once: its job id exists for another
    export (the feeder moves on; it never retries the item nor spends a slot on it)."""
    job_id = job_id_for(batch_id, index)
    reason = f"refused: job id {job_id} exists already for another export"
    keys = [batch_key(batch_id), refused_key(batch_id)]
    if rt.redis.eval(_REFUSE, 2, *keys, str(index), reason):
        log.warning("batch item refused: its job id exists", extra={"job_id": job_id})
    if complete(get(rt, batch_id)):
        dispatch_later(FINALIZE_TASK, [batch_id], 0.0)


def refusal(rt: Runtime, batch_id: str, index: int) -> str | None:
    """Why item ``index`` got no job of its own, if it was refused."""
    raw = rt.redis.hget(refused_key(batch_id), str(index))
    return raw.decode() if raw is not None else None  # type: ignore[union-attr]


def cancel(rt: Runtime, batch_id: str) -> bool:
    """Stop new requests now; jobs already with APSIS finish. True if it was running."""
    batch = get(rt, batch_id)
    if batch.state != "running":
        return False
    rt.redis.hset(batch_key(batch_id), "state", "cancelled")
    rt.redis.zrem(RUNNING_KEY, batch_id)
    log.warning("batch cancelled", extra={"batch_id": batch_id})
    return True


def is_cancelled(rt: Runtime, batch_id: str | None) -> bool:
    if not batch_id:
        return False
    state = rt.redis.hget(batch_key(batch_id), "state")
    return state is not None and state.decode() == "cancelled"  # type: ignore[union-attr]


def complete(batch: Batch) -> bool:
    if batch.state == "running":
        return batch.ended >= batch.total
    return batch.state == "cancelled" and batch.ended >= batch.submitted


def finalize(
    rt: Runtime,
    batch_id: str,
    send_chain: Callable[[dict[str, Any], dict[str, Any]], None],
) -> bool:
    """Write summary.csv, then the batch manifest (last), announce it, resume its chain.

    Idempotent: a re-run rewrites the same objects; the chain is sent once.
    """
    batch = get(rt, batch_id)
    if batch.is_final or not complete(batch):
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
    refused = refusal(rt, batch.batch_id, index)
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


def on_job_end(rt: Runtime, batch_id: str | None, dispatch: pipeline.Dispatch) -> None:
    """After a batch job ended: if it was the batch's last, finalize the batch."""
    if batch_id and exists(rt, batch_id) and complete(get(rt, batch_id)):
        dispatch(FINALIZE_TASK, [batch_id])


class BatchFeeder:
    """The feeder thread of one worker node: feeds every running batch whose lease it gets."""

    def __init__(self, runtime: Callable[[], Runtime], dispatch_later: DispatchLater) -> None:
        self._runtime = runtime
        self._dispatch_later = dispatch_later
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._not_before: dict[str, float] = {}

    def run_once(self) -> bool:
        """Feed each running batch that is due; True if any was fed."""
        rt = self._runtime()
        fed = False
        running: list[bytes] = rt.redis.zrange(RUNNING_KEY, 0, -1)  # type: ignore[assignment]
        for raw in running:
            batch_id = raw.decode()
            if self._stop.is_set() or self._not_before.get(batch_id, 0.0) > time.monotonic():
                continue
            again = feed(rt, batch_id, self._dispatch_later)
            if again is None:
                self._not_before[batch_id] = time.monotonic() + FEED_IDLE
            else:
                fed = True
                self._not_before[batch_id] = time.monotonic() + again
        return fed

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.run_once():
                    self._stop.wait(FEED_IDLE)
            except Exception:
                log.exception("batch feeder error")
                self._stop.wait(1.0)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="apsis-feeder", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


# -- merged profiles that are items of the same batch ------------------------------------


def _own_index(job_id: str) -> int | None:
    tail = job_id.rpartition(".")[2]
    return int(tail) if tail.isdigit() else None


def merged_links(
    rt: Runtime, batch_id: str | None, job_id: str, merged: list[str]
) -> dict[str, dict[str, Any]]:
    """For each merged key that is also an item of the job's batch: ``batch_item`` (its
    index) and, if that item's job exists, ``linked_job``. Empty outside batches."""
    if not batch_id or not merged:
        return {}
    found = rt.redis.hmget(index_key(batch_id), merged)
    own = _own_index(job_id)
    links: dict[str, dict[str, Any]] = {}
    for key, raw in zip(merged, found, strict=True):
        if raw is None or int(raw) == own:
            continue
        index = int(raw)
        entry: dict[str, Any] = {"batch_item": index}
        if rt.jobs.exists(job_id_for(batch_id, index)) and refusal(rt, batch_id, index) is None:
            entry["linked_job"] = job_id_for(batch_id, index)
        links[key] = entry
    return links


def mark_linked(
    rt: Runtime, batch_id: str | None, job_id: str, links: dict[str, dict[str, Any]]
) -> None:
    """After ``job_id`` is done: the items it holds as merged profiles need no job of their
    own (the first finished job to hold an item keeps it)."""
    if not batch_id:
        return
    for entry in links.values():
        rt.redis.hsetnx(linked_key(batch_id), str(entry["batch_item"]), job_id)


def skip_if_linked(rt: Runtime, batch_id: str, index: int) -> bool:
    """Count item ``index`` as submitted and linked if a finished job already holds it."""
    if rt.redis.hget(linked_key(batch_id), str(index)) is None:
        return False
    if rt.jobs.exists(job_id_for(batch_id, index)):
        return False
    pipe = rt.redis.pipeline(transaction=True)
    pipe.hincrby(batch_key(batch_id), "submitted", 1)
    pipe.hincrby(batch_key(batch_id), "linked", 1)
    pipe.execute()
    log.info("batch item linked to a merged profile", extra={"batch_id": batch_id})
    return True


def is_linked(rt: Runtime, batch_id: str, index: int) -> bool:
    """Item ``index`` was counted as linked (no job of its own)."""
    return rt.redis.hget(linked_key(batch_id), str(index)) is not None and not rt.jobs.exists(
        job_id_for(batch_id, index)
    )
