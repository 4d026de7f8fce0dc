"""The periodic sweep: jobs whose callback never came, jobs past their deadline, stuck jobs.

Every worker runs it (from the inbox thread); a Redis lock that lives one interval lets at
most one sweep per interval run in the whole pool. It never waits: it only dispatches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from worker.flow import pipeline, retention
from worker.flow.runtime import Runtime
from worker.model.batch_store import FINALIZE_TASK
from worker.model.jobs import State
from worker.model.lease import LEASE_SECONDS, JobLease

log = logging.getLogger("apsis.watchdog")

#: Jobs handled per category in one sweep (the next sweep takes the rest).
SWEEP_BATCH = 500
LOCK_KEY = "apsis:watchdog:lock"


@dataclass
class SweepReport:
    rerequested: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    redispatched: list[str] = field(default_factory=list)
    chains_resumed: list[str] = field(default_factory=list)
    #: Batches whose finalize (or chain) was lost or gave up: their finalize dispatched again.
    batches_finalized: list[str] = field(default_factory=list)
    #: Jobs and batches deleted under RETENTION_DAYS.
    deleted: list[str] = field(default_factory=list)
    #: Task messages a lost broker connection left in flight, put back on the queue.
    requeued_messages: int = 0


def try_sweep(
    rt: Runtime,
    dispatch: pipeline.Dispatch,
    send_chain: Callable[[dict[str, Any], dict[str, Any]], None],
    *,
    now: float | None = None,
    recover_messages: Callable[[], int] | None = None,
) -> SweepReport | None:
    """Sweep if no other process swept within WATCHDOG_INTERVAL; None if it was not our turn.

    ``recover_messages``: the queue's own repair (task messages a lost connection left in
    flight), run within the same sweep; it returns how many it put back."""
    interval_ms = int(rt.settings.WATCHDOG_INTERVAL * 1000)
    if not rt.redis.set(LOCK_KEY, "1", nx=True, px=interval_ms):
        return None
    return sweep(rt, dispatch, send_chain, now=now, recover_messages=recover_messages)


def sweep(
    rt: Runtime,
    dispatch: pipeline.Dispatch,
    send_chain: Callable[[dict[str, Any], dict[str, Any]], None],
    *,
    now: float | None = None,
    recover_messages: Callable[[], int] | None = None,
) -> SweepReport:
    now = time.time() if now is None else now
    report = SweepReport()
    s = rt.settings

    for job_id in rt.jobs.past_deadline(now, limit=SWEEP_BATCH):
        job = rt.jobs.find(job_id)
        if job is not None and not job.is_final:
            hours = s.EXPORT_DEADLINE / 3600
            if pipeline.fail(rt, job_id, f"not done within EXPORT_DEADLINE ({hours:g} h)"):
                report.failed.append(job_id)

    for job_id in rt.jobs.overdue(now, limit=SWEEP_BATCH):
        job = rt.jobs.find(job_id)
        if job is None or job.state not in (State.REQUESTED, State.VERIFIED):
            continue
        reason = f"no ready callback within {s.APSIS_CALLBACK_TIMEOUT} s"
        if pipeline.attempts_used(job) < pipeline.MAX_ATTEMPTS:
            if pipeline.rerequest(rt, job, reason, dispatch):
                report.rerequested.append(job_id)
        elif pipeline.fail(rt, job_id, f"{reason} after {job.attempt} attempts"):
            report.failed.append(job_id)

    # A fetch whose worker died: it had begun (fetch_started_at), its lease has lapsed (no
    # heartbeat for LEASE_SECONDS), and the job is still ready. Back on the road at the next
    # sweep, not after WATCHDOG_STUCK_AFTER: within LEASE_SECONDS + WATCHDOG_INTERVAL of the
    # death. A slow but living holder keeps its lease, so it never gets a second copy.
    for job_id in rt.jobs.idle_since(now - LEASE_SECONDS, limit=SWEEP_BATCH):
        job = rt.jobs.find(job_id)
        if job is None or job.state != State.READY or not job.extra.get("fetch_started_at"):
            continue
        if float(job.extra.get("retry_at", "0") or 0) > now:
            continue  # its fetch was told to retry later: not orphaned
        if JobLease(rt.redis, job_id).held_elsewhere():
            continue
        account = job.account or rt.settings.APSIS_ACCOUNT
        if rt.fetches.place(account, job_id) is not None:
            continue  # back in the download line already (a retry became due)
        pipeline.to_download(rt, job, dispatch)
        report.redispatched.append(job_id)
        rt.jobs.touch(job_id, now)
        log.warning(
            "fetch resumed: its worker stopped beating",
            extra={"job_id": job_id, "event": "fetch_orphaned"},
        )

    for job_id in rt.jobs.idle_since(now - s.WATCHDOG_STUCK_AFTER, limit=SWEEP_BATCH):
        job = rt.jobs.find(job_id)
        if job is None:
            continue
        if float(job.extra.get("retry_at", "0") or 0) > now:
            continue  # a retry is scheduled; not stuck
        if JobLease(rt.redis, job_id).held_elsewhere():
            continue  # a live worker is on it
        account = job.account or rt.settings.APSIS_ACCOUNT
        waiting = (job.state == State.QUEUED and rt.line.place(account, job_id)) or (
            job.state == State.READY and rt.fetches.place(account, job_id)
        )
        if waiting:
            rt.jobs.touch(job_id, now)
            continue  # waiting in its account's request or download line: not stuck
        if job.state == State.QUEUED:
            dispatch(pipeline.REQUEST_TASK, [job_id])
            report.redispatched.append(job_id)
        elif job.state == State.READY:
            pipeline.to_download(rt, job, dispatch)
            report.redispatched.append(job_id)
        elif job.state == State.DONE and pipeline.resume_caller_chain(rt, job_id, send_chain):
            report.chains_resumed.append(job_id)
        if job.state in (State.QUEUED, State.READY):
            # Count this as activity, so the next sweep gives the task time to run.
            rt.jobs.touch(job_id, now)

    _sweep_batches(rt, dispatch, now, report)
    if rt.storage.usable_here:
        report.deleted = retention.sweep(rt, now=now)
    elif retention.due(rt, now=now):
        # A worker's main process does no storage I/O: a pool process deletes.
        dispatch(retention.RETENTION_TASK, [])
    if recover_messages is not None:
        report.requeued_messages = recover_messages()

    if (
        report.rerequested
        or report.failed
        or report.redispatched
        or report.chains_resumed
        or report.batches_finalized
        or report.requeued_messages
    ):
        log.warning(
            "watchdog sweep acted",
            extra={
                "event": "watchdog",
                "reason": (
                    f"rerequested={len(report.rerequested)} failed={len(report.failed)} "
                    f"redispatched={len(report.redispatched)} "
                    f"chains={len(report.chains_resumed)} "
                    f"batches_finalized={len(report.batches_finalized)} "
                    f"requeued_messages={report.requeued_messages}"
                ),
            },
        )
    return report


def _sweep_batches(
    rt: Runtime, dispatch: pipeline.Dispatch, now: float, report: SweepReport
) -> None:
    """Batches whose finalize was lost (or gave up) are finalized (feeder threads pick up the
    rest). A batch complete for the first time here gets WATCHDOG_STUCK_AFTER for its own
    finalize (dispatched when its last job ended) before the sweep steps in; while it is not
    complete, the sweep only notes that it looked."""
    stuck_after = rt.settings.WATCHDOG_STUCK_AFTER
    for batch_id in rt.batches.stale_ids(now - stuck_after):
        if not rt.batches.exists(batch_id):
            rt.batches.forget_running(batch_id)
            continue
        batch = rt.batches.get(batch_id)
        if batch.is_final and not batch.needs_finalize:
            rt.batches.forget_running(batch_id)
            continue
        if batch.needs_finalize and rt.batches.complete_since(batch_id, now) <= now - stuck_after:
            rt.batches.mark_rescued(batch_id, now)
            dispatch(FINALIZE_TASK, [batch_id])
            report.batches_finalized.append(batch_id)
        rt.batches.seen_running(batch_id, now)
