"""The export's steps, as plain functions of a Runtime: the tasks call these and nothing else.

submit → request (APSIS 202, the job waits, no task runs) → callback recorded by the webhook
→ apply_callback (ready: fetch dispatched) → fetch_and_store → finish (manifest last, the
caller's chain resumed).
"""

from __future__ import annotations

import hashlib
import logging
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from worker.deliverable import manifest, report
from worker.deliverable.export_file import SplitResult, split_export
from worker.errors import (
    ApsisAuthError,
    ConfigError,
    CorruptExport,
    DownloadError,
    DownloadRefused,
    DownloadTooLarge,
    InvalidExportKey,
    JobIdConflict,
    PermanentApsisError,
    RateLimited,
    RetryableApsisError,
    StorageError,
)
from worker.flow import delivery
from worker.flow.runtime import Runtime
from worker.model import callback_token, ids
from worker.model.batch_store import FINALIZE_TASK
from worker.model.inbox import Callback
from worker.model.jobs import ExportOptions, Job, State, new_job_id
from worker.model.lease import JobLease, LeaseBusy
from worker.telemetry import metrics

log = logging.getLogger("apsis.pipeline")

#: Retries (APSIS errors, storage errors, bad downloads) one job may spend in all.
MAX_RETRIES_PER_JOB = 30
#: Times a bad download (truncated, corrupt, 410) is fetched again before re-requesting.
MAX_FETCHES_PER_ATTEMPT = 3
#: Export requests (attempts) one job may make before it fails.
MAX_ATTEMPTS = 4
#: Backoff: first delay and cap, in seconds (full jitter between half and the full value).
BACKOFF_BASE = 2.0
BACKOFF_CAP = 300.0
#: Task names, as strings: worker/ never imports tasks/.
FETCH_TASK = "apsis.fetch_export"
REQUEST_TASK = "apsis.request_export"
RECORD_FAILURE_TASK = "apsis.record_failure"

Dispatch = Callable[[str, list[Any]], None]

#: Fetches of one account dispatched and not yet begun before the download feeder waits:
#: enough to keep downloads going back to back, few enough that a busy pool does not collect
#: fetches whose download slots have passed (the line keeps the rest, in order).
FETCH_AHEAD = 2
#: Seconds a fetch may wait for its slot when it is dispatched at once (nothing in line).
FETCH_FAST_WAIT = 1.0


class RetryLater(Exception):
    """The step could not finish now; run it again after ``delay`` seconds."""

    def __init__(self, delay: float, reason: str) -> None:
        super().__init__(reason)
        self.delay = delay
        self.reason = reason


def backoff(retries: int, *, retry_after: float | None = None, cap: float = BACKOFF_CAP) -> float:
    """Exponential backoff with jitter; ``Retry-After`` wins when APSIS gave one."""
    if retry_after is not None:
        return min(max(retry_after, 0.05), cap)
    ceiling = min(cap, BACKOFF_BASE * 2 ** min(retries, 16))
    return random.uniform(ceiling / 2, ceiling)


def job_id_from_task_id(task_id: str | None) -> str:
    """A redelivered task message keeps its id, so the job it creates is the same job."""
    return task_id.replace("-", "") if task_id else new_job_id()


# -- submit and request ----------------------------------------------------------------


def submit(
    rt: Runtime,
    export_key: str,
    *,
    options: ExportOptions,
    job_id: str,
    reference: str | None = None,
    batch_id: str | None = None,
    account: str | None = None,
    chain: dict[str, Any] | None = None,
    urgent: bool = False,
) -> bool:
    """Create the job record (idempotent on ``job_id``); True if it is new.

    ``urgent``: its request goes ahead of every other waiting one of its account (the
    dispatch line's urgent lane); it does not change what the job is for.

    Raises JobIdConflict if ``job_id`` exists for another export key, options, account or
    batch."""
    ids.validate_export_key(export_key)
    if batch_id and ids.is_batch_item_id(job_id):
        if job_id.rpartition(".")[0] != batch_id:
            raise InvalidExportKey("a batch item's job id must be <its batch id>.<n>")
    else:
        ids.validate_new_job_id(job_id)  # a caller's id can never be a batch item's
    extra = {"job_id": job_id, "key_ref": rt.key_ref(export_key)}
    try:
        created = rt.jobs.create(
            job_id,
            export_key=export_key,
            account=account or rt.settings.APSIS_ACCOUNT,
            options=options,
            deadline_seconds=rt.settings.EXPORT_DEADLINE,
            reference=reference,
            batch_id=batch_id,
            chain=chain,
        )
    except JobIdConflict:
        # info: the caller is told (exit 2, a rejected task); stderr stays one line
        log.info("job id refused: it exists for another export", extra=extra)
        raise
    if created and urgent:
        rt.jobs.update(job_id, {"urgent": "1"})
    log.info("job created" if created else "job exists already", extra=extra)
    return created


def lane_of(job: Job) -> str:
    """The dispatch line's lane for a job's request (its first, or a re-request)."""
    if job.extra.get("urgent") == "1":
        return "urgent"
    return "batch" if job.batch_id else "single"


def place_in_line(rt: Runtime, job_id: str) -> bool:
    """Put a queued job's request in its account's dispatch line (no-op if it is in line
    already, or not queued). The dispatchers send it at a reserved slot; nothing polls."""
    job = rt.jobs.find(job_id)
    if job is None or job.state != State.QUEUED:
        return False
    account = job.account or rt.settings.APSIS_ACCOUNT
    placed = rt.line.enqueue(account, job_id, lane_of(job))
    if placed:
        log.info("request in line", extra={"job_id": job_id, "state": lane_of(job)})
    return placed


def to_download(rt: Runtime, job: Job, dispatch: Dispatch) -> None:
    """Put a ready job on the download road: its account's download line, served at the
    account's download limit by the feeders (``worker.flow.feeder``), singles ahead of batch
    items. When nothing waits ahead of it (fetches dispatched and not yet begun aside, up to
    FETCH_AHEAD), its lane's next fetch takes a slot here and is dispatched at once, so an
    export resumes within milliseconds unless the account's downloads are backed up."""
    account = job.account or rt.settings.APSIS_ACCOUNT
    lane = lane_of(job)
    joined = rt.fetches.join(account, job.job_id, lane)
    if joined == "behind" and not rt.fetches.clear_ahead(account, lane, FETCH_AHEAD):
        return  # others wait ahead, or the pool is busy: the feeder serves it in turn
    if joined != "present":
        try:
            limit = rt.apsis_for(account).limits.download
        except ConfigError:
            return  # the feeder fails it with the reason
        slot = rt.limiter.acquire(account, "download", limit, max_wait=FETCH_FAST_WAIT)
        if slot.granted:
            dispatch_fetch(rt, account, lane, slot.wait, dispatch)


def dispatch_fetch(rt: Runtime, account: str, lane: str, wait: float, dispatch: Dispatch) -> bool:
    """Dispatch the first fetch of ``lane`` with the download slot reserved for it, ``wait``
    seconds away; it stays on record as taken until it begins. False: the lane was empty
    (another dispatcher took it; the slot goes unused, once)."""
    job_id = rt.fetches.take(account, lane)
    if job_id is None:
        return False
    dispatch(FETCH_TASK, [job_id, time.time() + wait])
    return True


def download_later(rt: Runtime, job_id: str, delay: float) -> None:
    """A fetch told "not now" (its slot passed, APSIS answered 429/5xx, storage failed): it
    waits ``delay`` s out of the way, then joins the back of its download lane."""
    job = rt.jobs.find(job_id)
    if job is None or job.state != State.READY:
        return
    account = job.account or rt.settings.APSIS_ACCOUNT
    rt.fetches.wait_until(account, job_id, lane_of(job), time.time() + delay)


def callback_url(rt: Runtime, job: Job) -> str:
    s = rt.settings.require("CALLBACK_BASE_URL", "CALLBACK_SECRET")
    token = callback_token.issue(
        job.job_id, job.attempt, secret=s.CALLBACK_SECRET or "", ttl=s.CALLBACK_TOKEN_TTL
    )
    return f"{s.CALLBACK_BASE_URL}/callbacks/{token}"


#: Longest account name quoted in a failure reason (the name comes from the caller).
MAX_QUOTED_ACCOUNT = 64


def unknown_account(rt: Runtime, job: Job) -> str | None:
    """Why the job's APSIS account cannot be used, if it is not configured at all (a caller's
    typo, or an account since removed from APSIS_ACCOUNTS); None if it is configured.

    Such a job fails with this reason: retrying cannot help, and the ConfigError it would
    otherwise raise left it queued or ready until its deadline.
    """
    name = job.account or rt.settings.APSIS_ACCOUNT
    if name in rt.settings.account_names():
        return None
    return f"APSIS account {name[:MAX_QUOTED_ACCOUNT]!r} is not configured (APSIS_ACCOUNTS)"


def request(rt: Runtime, job_id: str, *, slot_at: float | None = None) -> None:
    """Ask APSIS for the export of a queued job; then the job waits and no task runs.

    Raises RetryLater for errors worth retrying; fails the job on permanent ones.
    """
    job = rt.jobs.get(job_id)
    if job.state != State.QUEUED:
        return  # already requested (a redelivered task) or finished
    if rt.batches.is_cancelled(job.batch_id):
        fail(rt, job_id, "batch cancelled before the export was requested")
        return
    if reason := unknown_account(rt, job):
        fail(rt, job_id, f"cannot request the export: {reason}")
        return
    ctx = {"job_id": job_id, "attempt": job.attempt, "batch_id": job.batch_id}
    try:
        rt.apsis_for(job.account).request_export(
            job.export_key,
            callback_url(rt, job),
            history=job.options.include_attribute_history,
            definitions=job.options.include_type_definitions,
            merged=job.options.include_merged_profiles,
            paced=slot_at is None,
            send_at=slot_at,
        )
    except RateLimited as exc:
        # Our own pool-wide limiter said "not yet": not a failure, not counted.
        raise RetryLater(exc.retry_after or 0.1, str(exc)) from None
    except RetryableApsisError as exc:
        _retry_or_fail(rt, job, str(exc), retry_after=exc.retry_after)
        return
    except PermanentApsisError as exc:
        fail(rt, job_id, str(exc))
        return
    now = time.time()
    _, state = rt.jobs.transition(
        job_id,
        State.REQUESTED,
        attempt=job.attempt,
        note="APSIS accepted the export request",
        waiting_until=now + rt.settings.APSIS_CALLBACK_TIMEOUT,
        now=now,
    )
    log.info("export requested; waiting for APSIS", extra={**ctx, "state": str(state)})


def _retry_or_fail(rt: Runtime, job: Job, reason: str, *, retry_after: float | None = None) -> None:
    """Raise RetryLater with a backoff, or (the job's retry budget spent) fail the job."""
    retries = rt.jobs.count_retry(job.job_id)
    if retries > MAX_RETRIES_PER_JOB:
        fail(rt, job.job_id, f"gave up after {MAX_RETRIES_PER_JOB} retries: {reason}")
        return
    delay = backoff(retries, retry_after=retry_after, cap=_retry_cap(rt))
    # The watchdog leaves a job alone until its scheduled retry is due.
    rt.jobs.update(job.job_id, {"retry_at": time.time() + delay})
    log.warning(
        "will retry",
        extra={"job_id": job.job_id, "reason": reason, "retry_in": round(delay, 2)},
    )
    metrics.retry_scheduled()
    raise RetryLater(delay, reason)


def _retry_cap(rt: Runtime) -> float:
    # A countdown beyond the visibility timeout would make Redis redeliver the task early.
    return min(BACKOFF_CAP, rt.settings.CELERY_VISIBILITY_TIMEOUT * 0.5)


# -- callbacks ---------------------------------------------------------------------------


def apply_callback(rt: Runtime, callback: Callback, dispatch: Dispatch) -> str:
    """Apply one recorded callback to its job; returns what happened (for logs and metrics).

    Idempotent: redelivering the same entry re-dispatches the fetch only if this entry is the
    one that made the job ready (the consumer may have died between the two).
    """
    if callback.code == 200 and _ready_fast(rt, callback, dispatch):
        return "ready"
    job = rt.jobs.find(callback.job_id)
    ctx = {"job_id": callback.job_id, "code": callback.code, "attempt": callback.attempt}
    ctx["batch_id"] = job.batch_id if job is not None else None
    if job is None:
        log.info("callback for an unknown job ignored", extra=ctx)
        return "unknown_job"
    if callback.attempt != job.attempt:
        log.info("callback for an older attempt ignored", extra=ctx)
        return "stale"
    if callback.code == 100:
        # From queued (APSIS called back before the request task recorded its 202, or that
        # task died in between) the job is in no watchdog set yet: start its callback
        # deadline here, or a dropped ready callback would leave it waiting forever.
        from_queued = job.state == State.QUEUED
        applied, _ = rt.jobs.transition(
            job.job_id,
            State.VERIFIED,
            attempt=job.attempt,
            allowed_from=(State.QUEUED, State.REQUESTED),
            note="APSIS verified the callback",
            keep_waiting=not from_queued,
            waiting_until=(
                time.time() + rt.settings.APSIS_CALLBACK_TIMEOUT if from_queued else None
            ),
        )
        return "verified" if applied else "duplicate"
    if callback.code == 200:
        # _ready_fast found the job past "ready" already: either this very entry made it
        # ready and the consumer died before dispatching (send the fetch again), or it is
        # a repeat (nothing to do).
        if job.state == State.READY and job.ready_entry == callback.entry_id:
            # Its place in the download line may be a dispatch that never left: place it
            # again (a second copy of a fetch that did leave ends at once: lease, state).
            rt.fetches.sent(job.account or rt.settings.APSIS_ACCOUNT, job.job_id)
            to_download(rt, job, dispatch)
            log.info("export ready; on the download road again", extra=ctx)
            return "ready"
        return "duplicate"
    # Any other code is APSIS reporting a failure. Its message is APSIS's free text, which
    # may name the profile (the sandbox's does): the job record keeps it, logs never do.
    logged = f"APSIS reported failure code {callback.code}"
    reason = f"{logged}: {callback.message[:200]}"
    if attempts_used(job) < MAX_ATTEMPTS and job.state in (
        State.QUEUED,
        State.REQUESTED,
        State.VERIFIED,
    ):
        if rerequest(rt, job, reason, dispatch, logged_reason=logged):
            return "rerequested"
        return "duplicate"
    applied = fail(
        rt,
        job.job_id,
        reason,
        logged_reason=logged,
        attempt=job.attempt,
        allowed_from=(State.QUEUED, State.REQUESTED, State.VERIFIED),
    )
    return "failed" if applied else "duplicate"


def _ready_fast(rt: Runtime, callback: Callback, dispatch: Dispatch) -> bool:
    """The common "ready": one atomic transition (it checks state and attempt), then dispatch.

    Saves reading the job first on the path the resume latency is measured on. When it does
    not apply (unknown job, older attempt, a repeat, or this same entry redelivered after a
    crash) the caller's full path decides, reading the job.
    """
    applied, _ = rt.jobs.transition(
        callback.job_id,
        State.READY,
        attempt=callback.attempt,
        allowed_from=(State.QUEUED, State.REQUESTED, State.VERIFIED),
        note="APSIS reported the export ready",
        # ready_received_at: when the webhook recorded the callback (bench/resume_latency).
        fields={
            "download_url": callback.message,
            "ready_entry": callback.entry_id,
            "ready_received_at": repr(callback.received_at),
        },
    )
    if applied:
        to_download(rt, rt.jobs.get(callback.job_id), dispatch)
        extra = {"job_id": callback.job_id, "code": 200, "attempt": callback.attempt}
        log.info("export ready; on the download road", extra=extra)
    return applied


def rerequest(
    rt: Runtime, job: Job, reason: str, dispatch: Dispatch, *, logged_reason: str | None = None
) -> bool:
    """Start a new attempt (a fresh callback token) for the job; old callbacks go stale.

    ``reason`` goes into the job's history; ``logged_reason``, when given, replaces it in the
    log line (for reasons carrying text from APSIS, which may hold personal data).
    """
    applied, _ = rt.jobs.transition(
        job.job_id,
        State.QUEUED,
        attempt=job.attempt,
        # From queued too: a failure callback may beat the request task's "requested".
        # Never from an end: only an operator's retry (restart) revives a failed job.
        allowed_from=(State.QUEUED, State.REQUESTED, State.VERIFIED, State.READY),
        new_attempt=True,
        note=f"re-requesting: {reason}",
        fields={"download_url": "", "ready_entry": ""},
    )
    if applied:
        metrics.rerequested()
        log.warning(
            "re-requesting the export",
            extra={"job_id": job.job_id, "reason": logged_reason or reason},
        )
        dispatch(REQUEST_TASK, [job.job_id])
    return applied


def attempts_used(job: Job) -> int:
    """Export requests spent since the job was created or an operator last restarted it."""
    return job.attempt - int(job.extra.get("attempt_base", "0") or 0)


def restart(rt: Runtime, job: Job, dispatch: Dispatch) -> bool:
    """Start a failed job again as a new attempt, as if it were new: a fresh deadline
    (EXPORT_DEADLINE from now), retry, fetch and attempt budgets. Its batch takes the failure
    back in the same step. Raises BatchEnded if its batch has ended or was cancelled.

    The attempt number keeps counting up (old callbacks and tokens stay stale); the attempt
    budget counts from here (``attempt_base``)."""
    now = time.time()
    applied, _ = rt.jobs.transition(
        job.job_id,
        State.QUEUED,
        attempt=job.attempt,
        allowed_from=(State.FAILED,),
        new_attempt=True,
        note="retry requested",
        now=now,
        fields={
            "error": "",
            "retries": 0,
            "fetches": 0,
            "retry_at": "",
            "download_url": "",
            "ready_entry": "",
            "deadline": now + rt.settings.EXPORT_DEADLINE,
            "attempt_base": job.attempt,
        },
    )
    if applied:
        rt.jobs.forget_failure(job.job_id)
        log.info("failed job restarted", extra={"job_id": job.job_id})
        dispatch(REQUEST_TASK, [job.job_id])
    return applied


# -- fetch, split, store, finish ------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """What the caller's chained task receives."""

    job_id: str
    state: str
    manifest: str | None
    reference: str | None
    profiles: int
    merged_keys_found: int
    #: The package's object name (``jobs/<job_id>/package.zip``); None without one.
    package: str | None = None
    #: A presigned link to it, only when the caller asked (``deliver``): a bearer credential.
    package_link: str | None = None
    package_link_expires_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        link = {
            "package_link": self.package_link,
            "package_link_expires_at": self.package_link_expires_at,
        }
        return {
            "job_id": self.job_id,
            "state": self.state,
            "manifest": self.manifest,
            "reference": self.reference,
            "profiles": self.profiles,
            "merged_keys_found": self.merged_keys_found,
            "package": self.package,
            **(link if self.package_link else {}),
        }


def fetch_and_store(
    rt: Runtime, job_id: str, dispatch: Dispatch, *, slot_at: float | None = None
) -> Result | None:
    """Download, verify, split and store a ready job, manifest last; None if nothing to do.

    ``slot_at``: the download slot (unix time) the download line reserved for this fetch;
    None: take one from the limiter now. Every object path derives from the job id, so a
    re-run rewrites the same objects. A lease keeps a second copy of this task from
    downloading the same file at once; that copy waits in the download line until the lease
    would lapse (its holder died: the copy carries on then) and looks again.
    """
    started_at = time.time()
    job = rt.jobs.get(job_id)
    # Begun: out of the download line (where a dispatched fetch is kept until it begins).
    rt.fetches.sent(job.account or rt.settings.APSIS_ACCOUNT, job_id)
    if job.state == State.DONE:
        return _result(job)
    if job.state != State.READY or not job.download_url:
        return None
    received_at = job.extra.get("ready_received_at")
    if received_at and not job.extra.get("fetch_started_at"):
        metrics.resume_started(float(received_at), started_at)  # the first fetch only
    # When the fetch began, beside ready_received_at: callback-to-fetch latency (bench/).
    rt.jobs.update(job_id, {"fetch_started_at": repr(started_at)})
    # The lease is renewed only while the step makes progress: a step hung for good (a
    # storage call that never returns) lets go of the job, and the sweep dispatches it again.
    lease = JobLease(
        rt.redis, job_id, stall_after=rt.settings.STEP_STALL_AFTER, replicas=rt.replicas
    )
    try:
        with lease, tempfile.TemporaryDirectory(prefix="apsis-") as tmp:
            # Read again under the lease: another copy may have finished it meanwhile.
            job = rt.jobs.get(job_id)
            if job.state != State.READY or not job.download_url:
                return _result(job) if job.state == State.DONE else None
            return _fetch_and_store(rt, job, Path(tmp), dispatch, lease.progress, slot_at=slot_at)
    except LeaseBusy as busy:
        # Another copy holds the job. If its worker died, the lease lapses within
        # retry_after: this copy waits in the download line until then and tries again
        # (the holder, if alive, renews it, and the job is done before long).
        raise RetryLater(busy.retry_after + 0.5, str(busy)) from None


class _ReportingWriter:
    """A file that calls ``progress()`` on every write (the download's chunks)."""

    def __init__(self, out: BinaryIO, progress: Callable[[], None]) -> None:
        self._out = out
        self._progress = progress

    def write(self, data: bytes) -> int:
        self._progress()
        return self._out.write(data)


def _fetch_and_store(
    rt: Runtime,
    job: Job,
    tmp: Path,
    dispatch: Dispatch,
    progress: Callable[[], None] = lambda: None,
    *,
    slot_at: float | None = None,
) -> Result | None:
    """``progress()`` is called as the step moves on: each chunk downloaded or uploaded,
    each part done (the job's lease is renewed only while it is)."""
    job_id = job.job_id

    def uploaded(_: int) -> None:
        progress()

    ctx = {"job_id": job_id, "attempt": job.attempt, "batch_id": job.batch_id}
    s = rt.settings
    source = tmp / "export.json"
    if reason := unknown_account(rt, job):
        fail(rt, job_id, f"cannot fetch the export: {reason}")
        return None
    try:
        with source.open("wb") as out:
            got = rt.apsis_for(job.account).download(
                job.download_url or "",
                cast(BinaryIO, _ReportingWriter(out, progress)),
                max_bytes=s.DOWNLOAD_MAX_BYTES,
                timeout=s.DOWNLOAD_TIMEOUT,
                send_at=slot_at,
            )
        progress()
        split = split_export(source, tmp / "split", requested_key=job.export_key)
        progress()
    except DownloadRefused as exc:
        log.error(
            "security: download URL refused; bearer token not sent",
            extra={**ctx, "event": "download_refused", "reason": str(exc)},
        )
        fail(rt, job_id, f"download refused: {exc}")
        return None
    except DownloadTooLarge as exc:
        fail(rt, job_id, str(exc))
        return None
    except RateLimited as exc:
        # Its download slot passed while it waited for a worker, and no new one is free
        # soon: not a failure, not counted; back in the download line. Say when it runs
        # again, so the sweep does not take the waiting fetch for an orphaned one.
        delay = exc.retry_after or 0.1
        rt.jobs.update(job.job_id, {"retry_at": time.time() + delay})
        raise RetryLater(delay, str(exc)) from None
    except (RetryableApsisError, ApsisAuthError) as exc:
        _retry_or_fail(rt, job, str(exc), retry_after=getattr(exc, "retry_after", None))
        return None
    except (CorruptExport, PermanentApsisError, DownloadError) as exc:
        _bad_download(rt, job, str(exc), gone=_is_gone(exc), dispatch=dispatch)
        return None
    try:
        rt.storage.put_file(manifest.export_object(job_id), source, progress=uploaded)
        for profile in split.profiles:
            rt.storage.put_file(
                manifest.profile_object(job_id, profile.index), profile.path, progress=uploaded
            )
            progress()
        # The readable report, streamed from the profile documents; listed in the manifest.
        reports = report.store_report(rt.storage, job, split, tmp / "report")
        progress()
        # The package a DPO hands over (and its link, if the caller asked for one).
        delivered = delivery.deliver_package(rt, job, split, tmp, progress)
        progress()
        links = _merged_links(rt, job, split)
        finished = time.time()
        done = {"state": State.DONE.value, "at": round(finished, 3), "note": "stored"}
        history = [*rt.jobs.history(job_id), done]
        body = manifest.encode(
            manifest.build_manifest(
                job,
                history=history,
                source_sha256=got.sha256,
                source_bytes=got.bytes,
                split=split,
                finished_at=finished,
                reports=reports,
                links=links,
                package=delivered.manifest_entry,
            )
        )
        rt.storage.put_bytes(manifest.manifest_object(job_id), body)  # the commit point
    except StorageError as exc:
        _retry_or_fail(rt, job, f"storage: {exc}")
        return None
    rt.jobs.transition(
        job_id,
        State.DONE,
        attempt=job.attempt,
        note="stored",
        fields={
            "manifest": rt.storage.location(manifest.manifest_object(job_id)),
            "manifest_sha256": hashlib.sha256(body).hexdigest(),
            "source_sha256": got.sha256,
            "source_bytes": got.bytes,
            "profiles": len(split.profiles),
            "merged_found": sum(1 for p in split.profiles if p.role == "merged"),
            "merged_keys": [p.export_key for p in split.profiles if p.role == "merged"],
            **delivered.job_fields,
        },
    )
    if links:
        rt.batches.mark_linked(job.batch_id, job_id, links)
    metrics.bytes_stored(got.bytes)
    _after_end(rt, job.batch_id, dispatch)
    log.info(
        "export stored",
        extra={**ctx, "bytes": got.bytes, "profiles": len(split.profiles), "state": "done"},
    )
    return _result(rt.jobs.get(job_id))


def _merged_links(rt: Runtime, job: Job, split: SplitResult) -> dict[str, dict[str, Any]]:
    """Merged keys that are items of the job's batch: linked, so not exported twice."""
    if not job.batch_id:
        return {}
    merged = [p.export_key for p in split.profiles if p.role == "merged"]
    return rt.batches.merged_links(job.batch_id, job.job_id, merged)


def _bad_download(rt: Runtime, job: Job, reason: str, *, gone: bool, dispatch: Dispatch) -> None:
    """Fetch a truncated or corrupt file again; after that (or once the link is gone, 410),
    ask APSIS for a new export; after MAX_ATTEMPTS of those, fail the job."""
    fetches = int(job.extra.get("fetches", "0") or 0) + 1
    rt.jobs.update(job.job_id, {"fetches": fetches})
    if fetches < MAX_FETCHES_PER_ATTEMPT and not gone:
        _retry_or_fail(rt, job, f"bad download: {reason}")
        return
    if attempts_used(job) < MAX_ATTEMPTS:
        rt.jobs.update(job.job_id, {"fetches": 0})
        rerequest(rt, job, f"download failed: {reason}", dispatch)
        return
    fail(rt, job.job_id, f"download failed after {job.attempt} attempts: {reason}")


def _is_gone(exc: Exception) -> bool:
    return isinstance(exc, PermanentApsisError) and exc.status == 410


def _result(job: Job) -> Result:
    return Result(
        job_id=job.job_id,
        state=job.state.value,
        manifest=job.manifest,
        reference=job.reference,
        profiles=job.profiles or 0,
        merged_keys_found=int(job.extra.get("merged_found", "0") or 0),
        package=job.extra.get(delivery.PACKAGE_FIELD) or None,
        package_link=job.extra.get(delivery.LINK_FIELD) or None,
        package_link_expires_at=float(job.extra.get(delivery.LINK_EXPIRES_FIELD) or 0) or None,
    )


def fail(
    rt: Runtime,
    job_id: str,
    reason: str,
    *,
    logged_reason: str | None = None,
    attempt: int | None = None,
    allowed_from: tuple[State, ...] | None = None,
) -> bool:
    """End the job as failed with ``reason``: failure manifest, event, batch bookkeeping.

    False if it had ended already (or, given ``attempt``, moved on to another attempt).
    ``logged_reason`` replaces ``reason`` in the log when the reason quotes APSIS's text.
    """
    applied, _ = rt.jobs.transition(
        job_id,
        State.FAILED,
        note=reason,
        fields={"error": reason},
        attempt=attempt,
        allowed_from=allowed_from,
    )
    if applied:
        job = rt.jobs.get(job_id)
        extra = {"job_id": job_id, "batch_id": job.batch_id, "state": "failed"}
        log.error("job failed", extra={**extra, "reason": logged_reason or reason})
        if rt.storage.usable_here:
            record_failure(rt, job_id)
        elif rt.dispatch is not None:
            # A worker's main process (the inbox consumer, the sweep, the feeder) does no
            # storage I/O: a pool process writes the failure manifest (storage.py says why).
            rt.dispatch(RECORD_FAILURE_TASK, [job_id])
        else:
            log.error("failure manifest not written: no pool to hand it to", extra=extra)
    return applied


def record_failure(rt: Runtime, job_id: str) -> None:
    """A failed job's failure manifest, its event, then its batch's bookkeeping (in that
    order); nothing if it is no longer failed (restarted, or deleted). Idempotent."""
    job = rt.jobs.find(job_id)
    if job is None or job.state != State.FAILED:
        return
    write_failure_manifest(rt, job, job.error or "failed")
    announce(rt, job)
    _after_end(rt, job.batch_id, None)


def _after_end(rt: Runtime, batch_id: str | None, dispatch: Dispatch | None) -> None:
    """A batch job ended: if it was the batch's last, have the batch finalized."""
    dispatch = dispatch or rt.dispatch
    if dispatch is not None and rt.batches.last_job_ended(batch_id):
        dispatch(FINALIZE_TASK, [batch_id])


def write_failure_manifest(rt: Runtime, job: Job, reason: str) -> None:
    job_id = job.job_id
    body = manifest.build_failure_manifest(
        job, history=rt.jobs.history(job_id), reason=reason, failed_at=time.time()
    )
    try:
        rt.storage.put_bytes(manifest.manifest_object(job_id), manifest.encode(body))
    except StorageError as exc:
        # The job record still says failed, with the reason; storage can be re-tried later.
        log.error(
            "could not store the failure manifest", extra={"job_id": job_id, "reason": str(exc)}
        )


def announce(rt: Runtime, job: Job) -> None:
    """Publish the job's end on the events stream (for other services)."""
    rt.inbox.announce(
        {
            "type": "job",
            "job_id": job.job_id,
            "state": job.state.value,
            "manifest": job.manifest or "",
            # The package's object name (never a link: links are bearer credentials).
            "package": job.extra.get(delivery.PACKAGE_FIELD) or "",
            "batch_id": job.batch_id or "",
            "reference": job.reference or "",
        }
    )


def resume_caller_chain(
    rt: Runtime, job_id: str, send: Callable[[dict[str, Any], dict[str, Any]], None]
) -> bool:
    """Run whatever the caller chained after ``apsis.export_profile``, once, with the result.

    At least once: if the worker dies after sending and before marking it sent, the redelivered
    task sends it again (the same guarantee Celery's own chains give).
    """
    job = rt.jobs.get(job_id)
    if job.state != State.DONE or job.chain_dispatched:
        return False
    if job.chain:
        send(job.chain, _result(job).to_json())
    rt.jobs.mark_chain_dispatched(job_id)
    announce(rt, job)
    return True
