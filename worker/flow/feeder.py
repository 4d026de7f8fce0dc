"""The feeder: one paced, fair road to APSIS for every export request of an account.

Every worker node runs a feeder thread in its main process (no pool slot, so fetches never
delay it). For each account with work it takes the account's dispatch lease (one feeder
per account at a time; if its node dies the lease lapses and another node carries on) and,
for a slice, sends one request per slot the pool-wide limiter reserves:

- the urgent lane of the account's dispatch line (``worker.model.line``) first;
- then single exports (and re-requests of them), first come, first served;
- then batches: re-requests of batch items, else the next item of the next running batch
  in turn (round robin, so several batches share the slots fairly).

While singles wait, batches still get one slot in ``SINGLES_PER_BATCH_SLOT + 1``, so a
flood of singles cannot starve a running batch (and a batch cannot hold back a single by
more than that). A request is prepared before its slot and sent at the slot's time from a
small pool of sender threads; APSIS's "not now" (429, 5xx) puts it back in line until its
retry is due; nothing polls the limiter and nothing retries in a Celery task.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis

from worker.errors import ConfigError, JobIdConflict, PermanentApsisError, RetryableApsisError
from worker.flow import pipeline
from worker.flow.batches import DispatchLater, cancel
from worker.flow.runtime import Runtime
from worker.model.batch_store import (
    FINALIZE_TASK,
    Batch,
    batch_key,
    items_key,
    job_id_for,
    refused_key,
)
from worker.model.jobs import Job, State
from worker.model.lease import JobLease, LeaseBusy
from worker.model.line import LANES, DispatchLine

log = logging.getLogger("apsis.feeder")

#: Seconds a feeder serves one account before looking at the others.
FEED_SLICE = 10.0
#: Seconds an idle feeder waits before looking for work again.
FEED_IDLE = 0.2
#: Seconds the limiter may park the feeder for one slot before it looks around again.
FEED_MAX_WAIT = 1.0
#: Threads sending a feeder's requests (so one slow answer does not delay the next send).
SENDERS = 4
#: Seconds between two looks when every runnable batch has max_in_flight unfinished jobs.
FEED_FULL_PAUSE = 2.0
#: While singles wait, a batch gets every (SINGLES_PER_BATCH_SLOT + 1)th slot.
SINGLES_PER_BATCH_SLOT = 3
#: A request taken from the line and not sent within this many seconds was lost with its
#: feeder (its node died): it goes back to its place.
TAKEN_STALE = 30.0
#: A fetch dispatched and not begun within this many seconds was lost (its message went
#: with a node that died, or the pool is that busy): it goes back to its place. A second
#: copy of a fetch that was only slow to start ends at once (the job's lease or state).
FETCH_TAKEN_STALE = 60.0
#: Seconds a request interrupted by a Redis outage waits before it leaves again.
REDIS_RETRY_AFTER = 1.0

# KEYS: the batch, its refused hash. ARGV: the item's index, the reason. Counts the item as
# submitted and failed, once: 1 the first time, 0 after.
_REFUSE = """
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'submitted', 1)
redis.call('HINCRBY', KEYS[1], 'failed', 1)
return 1
"""


@dataclass(frozen=True)
class _Pick:
    """What the next slot goes to: a lane of the line, or a new item of a batch."""

    lane: str | None = None
    batch: Batch | None = None


class _Account:
    """What a feeder remembers of one account between slots (fairness only)."""

    def __init__(self) -> None:
        self.singles_in_a_row = 0
        self.next_batch = 0


def serve(
    rt: Runtime,
    account: str,
    dispatch_later: DispatchLater,
    state: _Account | None = None,
    *,
    slice_seconds: float = FEED_SLICE,
) -> float | None:
    """Send the account's waiting requests at their slots, for a slice.

    Returns the seconds after which the account wants serving again, or None when nothing
    of it waits (or another feeder holds its lease)."""
    try:
        with (
            JobLease(rt.redis, f"dispatch-{account}"),
            ThreadPoolExecutor(max_workers=SENDERS, thread_name_prefix="apsis-send") as senders,
        ):
            return _serve(
                rt,
                account,
                dispatch_later,
                state or _Account(),
                senders=senders,
                slice_seconds=slice_seconds,
            )
    except LeaseBusy:
        return None


def _serve(
    rt: Runtime,
    account: str,
    dispatch_later: DispatchLater,
    state: _Account,
    *,
    senders: ThreadPoolExecutor,
    slice_seconds: float,
) -> float | None:
    started = time.monotonic()
    recovered = rt.line.recover_taken(account, time.time() - TAKEN_STALE)
    if recovered:
        log.warning(
            "requests a dead feeder took are back in line",
            extra={"reason": f"{len(recovered)} request(s)", "event": "line_recovered"},
        )
    try:
        client = rt.apsis_for(account)
    except ConfigError as exc:
        _refuse_account(rt, account, str(exc), dispatch_later)
        return None
    limit = client.limits.export
    # Have a token before the first slot: fetching it inside the first sends would make
    # them late, bunching them with the requests one window later (a 429 from APSIS).
    refused: PermanentApsisError | None = None
    try:
        client.tokens.get()
    except PermanentApsisError as exc:
        # APSIS refuses our credentials (a wrong secret, a redirect): every request would
        # meet the same answer, so each waiting job fails with it, as a send would.
        log.error("APSIS refused a token", extra={"reason": str(exc)})
        refused = exc
    except RetryableApsisError as exc:
        # No token now (the token quota, an APSIS outage): look again when it may have one.
        return exc.retry_after or FEED_MAX_WAIT
    while time.monotonic() - started < slice_seconds:
        rt.line.promote_due(account)
        pick = _pick(rt, account, state, dispatch_later)
        if pick is None:
            due = rt.line.next_retry_at(account)
            if due is not None:
                return max(0.05, min(due - time.time(), FEED_IDLE))
            if _has_full_batch(rt, account):
                return FEED_FULL_PAUSE
            rt.line.forget_account_if_idle(account)
            return None
        if refused is not None:
            if (job_id := _take(rt, account, pick, dispatch_later)) is not None:
                pipeline.fail(rt, job_id, f"cannot request the export: {refused}")
                rt.line.sent(account, job_id)
            continue
        slot = rt.limiter.acquire(account, "export", limit, max_wait=FEED_MAX_WAIT)
        if not slot.granted:
            return slot.wait
        # Prepare the job now and send at the slot's time: Redis work done after the wait
        # would delay some requests more than others and bunch them together at APSIS.
        slot_at = time.monotonic() + slot.wait
        job_id = _take(rt, account, pick, dispatch_later)
        if job_id is None:
            continue  # the item turned out linked or refused: the slot goes unused, once
        senders.submit(_send, rt, account, job_id, slot_at)
        # Do not run ahead of the slot: the next one is reserved only when this one is due.
        time.sleep(max(0.0, slot_at - time.monotonic()))
    return 0.0


def _pick(
    rt: Runtime, account: str, state: _Account, dispatch_later: DispatchLater
) -> _Pick | None:
    """The next slot's request, without taking it yet (one feeder per account: the lease)."""
    if rt.line.waiting(account, "urgent"):
        return _Pick(lane="urgent")
    singles = rt.line.waiting(account, "single") > 0
    batch_due = rt.line.waiting(account, "batch") > 0
    batch = None if batch_due else _next_batch(rt, account, state, dispatch_later)
    batches_wait = batch_due or batch is not None
    if singles and (not batches_wait or state.singles_in_a_row < SINGLES_PER_BATCH_SLOT):
        state.singles_in_a_row += 1
        return _Pick(lane="single")
    state.singles_in_a_row = 0
    if batch_due:
        return _Pick(lane="batch")
    if batch is not None:
        return _Pick(batch=batch)
    return None


def _runnable(rt: Runtime, account: str) -> list[Batch]:
    found = rt.batches.many(rt.batches.running_ids())
    runnable = [
        b for b in found if b.account == account and b.state == "running" and b.submitted < b.total
    ]
    # A stable order for the round robin (the running set's scores move with activity).
    return sorted(runnable, key=lambda b: (b.created_at, b.batch_id))


def _has_full_batch(rt: Runtime, account: str) -> bool:
    return any(b.in_flight >= b.max_in_flight for b in _runnable(rt, account))


def _next_batch(
    rt: Runtime, account: str, state: _Account, dispatch_later: DispatchLater
) -> Batch | None:
    """The next running batch in turn with an item to send (items held as merged profiles
    or refused are settled here, without a slot)."""
    runnable = [b for b in _runnable(rt, account) if b.in_flight < b.max_in_flight]
    for turn in range(len(runnable)):
        batch = runnable[(state.next_batch + turn) % len(runnable)]
        while batch.submitted < batch.total:
            index = batch.submitted
            if rt.batches.skip_if_linked(batch.batch_id, index):
                pass  # held as a merged profile by a finished job of the batch: no slot
            elif rt.jobs.exists(job_id_for(batch.batch_id, index)):
                # Its job id is taken by a record this batch did not create: fails once.
                refuse_item(rt, batch.batch_id, index, dispatch_later)
            else:
                state.next_batch = (state.next_batch + turn + 1) % max(len(runnable), 1)
                return batch
            batch = rt.batches.get(batch.batch_id)
            if batch.complete:
                dispatch_later(FINALIZE_TASK, [batch.batch_id], 0.0)
    return None


def _take(rt: Runtime, account: str, pick: _Pick, dispatch_later: DispatchLater) -> str | None:
    if pick.lane is not None:
        return rt.line.take(account, pick.lane)
    assert pick.batch is not None
    batch = pick.batch
    index = batch.submitted
    raw = rt.redis.lindex(items_key(batch.batch_id), index)
    if raw is None:
        return None
    export_key, reference = json.loads(raw)
    job_id = job_id_for(batch.batch_id, index)
    try:
        created = pipeline.submit(
            rt,
            export_key,
            options=batch.options,
            job_id=job_id,
            reference=reference or batch.reference,
            batch_id=batch.batch_id,
            account=batch.account,
        )
    except JobIdConflict:
        created = False
    if not created:  # taken since the look above: this slot goes unused, once
        refuse_item(rt, batch.batch_id, index, dispatch_later)
        return None
    # On record like any taken request: if this node dies before sending, it comes back.
    rt.line.hold(account, job_id, "batch")
    rt.batches.seen_running(batch.batch_id, time.time())
    return job_id


def _send(rt: Runtime, account: str, job_id: str, slot_at: float) -> None:
    try:
        pipeline.request(rt, job_id, slot_at=slot_at)  # the slot reserved for this request
    except pipeline.RetryLater as later:
        # APSIS said "not now" (or the job's lease is busy): back to its place when due.
        rt.line.retry_later(account, job_id, time.time() + later.delay)
        log.info(
            "request back in line until its retry",
            extra={"job_id": job_id, "reason": later.reason, "retry_in": later.delay},
        )
        return
    except redis.RedisError as exc:
        # Redis went away mid-send (a restart, a failover): back to its place as soon as
        # Redis answers again, rather than after TAKEN_STALE. If it is still away, the
        # request stays taken and the next feeder puts it back after TAKEN_STALE.
        log.warning(
            "request interrupted by Redis; back in line",
            extra={"job_id": job_id, "reason": type(exc).__name__},
        )
        with contextlib.suppress(redis.RedisError):
            rt.line.retry_later(account, job_id, time.time() + REDIS_RETRY_AFTER)
        return
    except Exception:
        # Left taken: the next feeder of this account puts it back after TAKEN_STALE.
        log.exception("request failed", extra={"job_id": job_id})
        return
    rt.line.sent(account, job_id)
    # APSIS may call back (a failure code: re-request) before its 202 is recorded here; that
    # re-request found the job still in line and left it there. Now it is out: place it.
    pipeline.place_in_line(rt, job_id)


def _refuse_account(rt: Runtime, account: str, reason: str, dispatch_later: DispatchLater) -> None:
    """The account is not configured (removed from APSIS_ACCOUNTS since): nothing of it can
    be sent, now or later. Its waiting jobs fail with the reason; its batches stop."""
    log.error("account not configured", extra={"reason": reason})
    for lane in ("urgent", "single", "batch"):
        while (job_id := rt.line.take(account, lane)) is not None:
            pipeline.fail(rt, job_id, f"cannot request the export: {reason}")
            rt.line.sent(account, job_id)
    rt.line.forget_account_if_idle(account)
    for batch in _runnable(rt, account):
        if cancel(rt, batch.batch_id) and rt.batches.get(batch.batch_id).complete:
            dispatch_later(FINALIZE_TASK, [batch.batch_id], 0.0)


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


def serve_downloads(
    rt: Runtime,
    account: str,
    dispatch_later: DispatchLater,
    state: _Account | None = None,
    *,
    slice_seconds: float = FEED_SLICE,
) -> float | None:
    """Dispatch the account's waiting fetches at their download slots, for a slice: urgent
    first, then singles, then batch items (with the same guaranteed share as requests).

    A fetch is dispatched with its slot's time and downloads then; at most ``FETCH_AHEAD``
    are dispatched and not yet begun, so a busy pool leaves the rest waiting here, in order,
    rather than in the broker's queue. Returns as ``serve`` does."""
    try:
        with JobLease(rt.redis, f"download-{account}"):
            return _serve_downloads(rt, account, dispatch_later, state or _Account(), slice_seconds)
    except LeaseBusy:
        return None


def _serve_downloads(
    rt: Runtime,
    account: str,
    dispatch_later: DispatchLater,
    state: _Account,
    slice_seconds: float,
) -> float | None:
    started = time.monotonic()
    line = rt.fetches
    recovered = line.recover_taken(account, time.time() - FETCH_TAKEN_STALE)
    if recovered:
        log.warning(
            "fetches dispatched and never begun are back in line",
            extra={"reason": f"{len(recovered)} fetch(es)", "event": "line_recovered"},
        )
    try:
        limit = rt.apsis_for(account).limits.download
    except ConfigError as exc:
        for each in LANES:
            while (job_id := line.take(account, each)) is not None:
                pipeline.fail(rt, job_id, f"cannot fetch the export: {exc}")
                line.sent(account, job_id)
        line.forget_account_if_idle(account)
        return None

    def dispatch(name: str, args: list[Any]) -> None:
        dispatch_later(name, args, 0.0)

    while time.monotonic() - started < slice_seconds:
        line.promote_due(account)
        if line.taken_count(account) >= pipeline.FETCH_AHEAD:
            return FEED_IDLE  # the pool is busy: the next fetch waits here, in order
        lane = _pick_lane(line, account, state)
        if lane is None:
            due = line.next_retry_at(account)
            if due is not None:
                return max(0.05, min(due - time.time(), FEED_IDLE))
            line.forget_account_if_idle(account)
            return None
        slot = rt.limiter.acquire(account, "download", limit, max_wait=FEED_MAX_WAIT)
        if not slot.granted:
            return slot.wait
        if pipeline.dispatch_fetch(rt, account, lane, slot.wait, dispatch):
            time.sleep(slot.wait)  # the next slot is reserved only when this one is due
    return 0.0


def _pick_lane(line: DispatchLine, account: str, state: _Account) -> str | None:
    """Urgent, then singles; batch items get one slot in SINGLES_PER_BATCH_SLOT + 1."""
    if line.waiting(account, "urgent"):
        return "urgent"
    singles = line.waiting(account, "single") > 0
    batches_wait = line.waiting(account, "batch") > 0
    if singles and (not batches_wait or state.singles_in_a_row < SINGLES_PER_BATCH_SLOT):
        state.singles_in_a_row += 1
        return "single"
    state.singles_in_a_row = 0
    return "batch" if batches_wait else None


def place_of(rt: Runtime, job: Job) -> dict[str, Any] | None:
    """Where a waiting job stands, and about when it leaves (None: in no line): a queued
    job's request in the request line, a ready job's fetch in the download line
    (``"line"``: "request" or "download").

    The estimate counts those ahead of it at the account's paced rate, and the slots
    batches keep while singles wait; one waiting for its retry leaves when that is due."""
    if job.state == State.QUEUED:
        line, which = rt.line, "request"
    elif job.state == State.READY:
        line, which = rt.fetches, "download"
    else:
        return None
    account = job.account or rt.settings.APSIS_ACCOUNT
    place = line.place(account, job.job_id)
    if place is None:
        return None
    found: dict[str, Any] = {"line": which, "lane": place.lane, "ahead": place.ahead}
    if place.retry_at is not None:
        return {**found, "eta_seconds": round(max(place.retry_at - time.time(), 0.0), 1)}
    try:
        limits = rt.apsis_for(account).limits
    except ConfigError:
        return {**found, "eta_seconds": None}
    interval = (limits.export if which == "request" else limits.download).interval
    share = 1.0
    batches_wait = _runnable(rt, account) if which == "request" else line.waiting(account, "batch")
    if place.lane == "single" and batches_wait:
        share = (SINGLES_PER_BATCH_SLOT + 1) / SINGLES_PER_BATCH_SLOT
    eta = (place.ahead + 1) * interval * share
    return {**found, "eta_seconds": round(eta, 1)}


def accounts_with_work(rt: Runtime) -> list[str]:
    """Accounts with requests in line or a running batch."""
    found = set(rt.line.accounts())
    found.update(b.account for b in rt.batches.many(rt.batches.running_ids()))
    return sorted(found)


class Feeder:
    """A feeder thread of one worker node: serves every account whose lease it gets, on one
    road: export requests (``serve``) or, with ``downloads``, fetches (``serve_downloads``).
    Each node runs one of each, so a long request slice never delays a download."""

    def __init__(
        self,
        runtime: Callable[[], Runtime],
        dispatch_later: DispatchLater,
        *,
        downloads: bool = False,
    ) -> None:
        self._runtime = runtime
        self._dispatch_later = dispatch_later
        self._downloads = downloads
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._not_before: dict[str, float] = {}
        self._accounts: dict[str, _Account] = {}

    def run_once(self) -> bool:
        """Serve each account that is due; True if any was served."""
        rt = self._runtime()
        served = False
        accounts = rt.fetches.accounts() if self._downloads else accounts_with_work(rt)
        serve_one = serve_downloads if self._downloads else serve
        for account in accounts:
            if self._stop.is_set() or self._not_before.get(account, 0.0) > time.monotonic():
                continue
            state = self._accounts.setdefault(account, _Account())
            again = serve_one(rt, account, self._dispatch_later, state)
            if again is None:
                self._not_before[account] = time.monotonic() + FEED_IDLE
            else:
                served = True
                self._not_before[account] = time.monotonic() + again
        return served

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.run_once():
                    self._stop.wait(FEED_IDLE)
            except Exception:
                log.exception("feeder error")
                self._stop.wait(1.0)

    def start(self) -> None:
        name = "apsis-download-feeder" if self._downloads else "apsis-feeder"
        self._thread = threading.Thread(target=self.run, name=name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
