"""The feeder: every export request of a batch leaves at a slot reserved for it.

A feeder thread runs in every worker's main process (no pool slot, so fetches never delay
it). It takes a running batch's lease, creates each job and sends its request when the
pool-wide limiter grants a slot, up to ``max_in_flight`` unfinished jobs. One feeder per
batch at a time; if its node dies the lease expires and another node's feeder carries on.
The batches' records are ``worker.model.batch_store``; creating, cancelling and
finalizing a batch are ``worker.flow.batches``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from worker.errors import ConfigError, JobIdConflict
from worker.flow import pipeline
from worker.flow.batches import DispatchLater, cancel
from worker.flow.runtime import Runtime
from worker.model.batch_store import (
    FINALIZE_TASK,
    RUNNING_KEY,
    batch_key,
    items_key,
    job_id_for,
    refused_key,
)
from worker.model.lease import JobLease, LeaseBusy

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

# KEYS: the batch, its refused hash. ARGV: the item's index, the reason. Counts the item as
# submitted and failed, once: 1 the first time, 0 after.
_REFUSE = """
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'submitted', 1)
redis.call('HINCRBY', KEYS[1], 'failed', 1)
return 1
"""


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
    batch = rt.batches.get(batch_id)
    try:
        client = rt.apsis_for(batch.account)
    except ConfigError as exc:
        # Its account was removed from APSIS_ACCOUNTS since: no request can be sent, now or
        # later. Stop it (its sent jobs finish) rather than fail in this thread forever.
        log.error("batch account not configured", extra={"batch_id": batch_id, "reason": str(exc)})
        if cancel(rt, batch_id) and rt.batches.get(batch_id).complete:
            dispatch_later(FINALIZE_TASK, [batch_id], 0.0)
        return None
    limit = client.limits.export
    # Have a token before the first slot: fetching it inside the first sends would make
    # them late, bunching them with the requests one window later (a 429 from APSIS).
    client.tokens.get()
    while time.monotonic() - started < FEED_SLICE:
        batch = rt.batches.get(batch_id)
        rt.redis.zadd(RUNNING_KEY, {batch_id: time.time()})
        if batch.state != "running" or batch.submitted >= batch.total:
            return None  # stays in RUNNING_KEY until finalized: the watchdog's safety net
        if batch.in_flight >= batch.max_in_flight:
            return FEED_FULL_PAUSE
        # Held as a merged profile by a finished job of the batch: linked, no slot spent.
        if rt.batches.skip_if_linked(batch_id, batch.submitted):
            if rt.batches.get(batch_id).complete:
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
    if rt.batches.get(batch_id).complete:
        dispatch_later(FINALIZE_TASK, [batch_id], 0.0)


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
