"""Prometheus metrics, defined once here; safe across Celery prefork and gunicorn processes.

Counters and histograms are recorded by whichever process did the work (in multiprocess
mode, into files under ``PROMETHEUS_MULTIPROC_DIR`` that every scrape sums). Gauges about the
pool (jobs by state, the oldest waiting job, the nearest deadline, the inbox backlog) are
read from Redis at scrape time, so every target reports the same pool-wide values.

No label carries personal data or an id: only codes, HTTP statuses, endpoints, states and
outcomes, each from a small fixed set.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import glob
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    multiprocess,
    values,
)
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

log = logging.getLogger("apsis.metrics")

#: The environment variable prometheus-client reads to switch to multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Every metric's name starts with this.
PREFIX = "apsis_export_"
#: The content type of ``render()``'s answer.
CONTENT_TYPE = CONTENT_TYPE_LATEST

#: Latency buckets, in seconds, for calls to APSIS (a download's is time to its headers).
APSIS_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Seconds from the "ready" callback to the fetch task's start.
RESUME_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
#: Seconds the pool-wide rate limiter told a caller to wait (at most DEFAULT_MAX_WAIT).
WAIT_BUCKETS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 5.0)

#: The job states, listed so each appears (as 0) before any job has reached it.
JOB_STATES = ("queued", "requested", "verified", "ready", "done", "failed")


class Metrics:
    """The process's metric objects (counters and histograms; gauges are scraped)."""

    def __init__(self) -> None:
        # Only used in single-process mode; in multiprocess mode the files are the registry.
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.callbacks_received = Counter(
            PREFIX + "callbacks_received",
            "Callbacks the webhook answered, by APSIS code and outcome.",
            ["code", "outcome"],
            registry=r,
        )
        self.callbacks_applied = Counter(
            PREFIX + "callbacks_applied",
            "Recorded callbacks the inbox consumer applied, by APSIS code and outcome.",
            ["code", "outcome"],
            registry=r,
        )
        self.callback_resume_seconds = Histogram(
            PREFIX + "callback_resume_seconds",
            "Seconds from a 'ready' callback's arrival to the start of its fetch task.",
            buckets=RESUME_BUCKETS,
            registry=r,
        )
        self.apsis_requests = Counter(
            PREFIX + "apsis_requests",
            "Calls to APSIS One by endpoint and HTTP status ('error': no answer).",
            ["endpoint", "status"],
            registry=r,
        )
        self.apsis_request_seconds = Histogram(
            PREFIX + "apsis_request_seconds",
            "Seconds a call to APSIS One took (a download: until its headers).",
            ["endpoint"],
            buckets=APSIS_BUCKETS,
            registry=r,
        )
        self.ratelimit_wait_seconds = Histogram(
            PREFIX + "ratelimit_wait_seconds",
            "Seconds the pool-wide rate limiter made a granted caller wait.",
            ["kind"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.ratelimit_denied = Counter(
            PREFIX + "ratelimit_denied",
            "Slots the pool-wide rate limiter did not grant (the caller rescheduled).",
            ["kind"],
            registry=r,
        )
        self.retries = Counter(
            PREFIX + "retries",
            "Steps scheduled to run again after a retryable error.",
            registry=r,
        )
        self.rerequests = Counter(
            PREFIX + "rerequests",
            "Exports requested again from APSIS (a new attempt for the same job).",
            registry=r,
        )
        self.stored_bytes = Counter(
            PREFIX + "stored_bytes",
            "Bytes of export files downloaded and stored.",
            registry=r,
        )
        self.jobs_ended = Counter(
            PREFIX + "jobs_ended",
            "Jobs that reached a final state (done or failed).",
            ["state"],
            registry=r,
        )
        self.batches_ended = Counter(
            PREFIX + "batches_ended",
            "Batches finalized, by final state (done or cancelled).",
            ["state"],
            registry=r,
        )
        self.batches_rescued = Counter(
            PREFIX + "batches_finalized_by_safety_net",
            "Batches the watchdog's sweep finalized (or whose chain it resumed) after their "
            "own finalize was lost or gave up.",
            registry=r,
        )
        self.messages_restored = Counter(
            PREFIX + "messages_restored",
            "Task messages put back on the queue by the sweep, by reason ('node_lost': the "
            "worker node that had taken them stopped beating).",
            ["reason"],
            registry=r,
        )


@functools.cache
def metrics() -> Metrics:
    """This process's metrics, built on first use (after the entry point chose the mode)."""
    # prometheus-client picks its value class when it is imported; the entry point may have
    # set PROMETHEUS_MULTIPROC_DIR since, so pick again before the first metric exists.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    return Metrics()


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def prepare_multiprocess(role: str) -> str:
    """Switch this process group (a worker node, a gunicorn master) to multiprocess mode.

    Call in the parent before it forks and before any metric is recorded. An unset
    PROMETHEUS_MULTIPROC_DIR becomes a fresh temporary directory, removed when this process
    exits; a set one is emptied (its files belong to a previous run: each process group
    needs a directory of its own).
    """
    path = multiprocess_dir()
    if metrics.cache_info().currsize and path is None:
        log.warning("metrics were recorded before multiprocess mode was set up")
    if path is None:
        path = tempfile.mkdtemp(prefix=f"apsis-metrics-{role}-")
        os.environ[MULTIPROC_ENV] = path
        owner = os.getpid()

        def remove() -> None:
            # Forked children inherit atexit handlers: only the creator removes the dir.
            if os.getpid() == owner:
                shutil.rmtree(path, ignore_errors=True)

        atexit.register(remove)
    else:
        os.makedirs(path, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "*.db")):
            with contextlib.suppress(OSError):
                os.remove(stale)
    return path


def process_exited(pid: int) -> None:
    """A child process (pool worker, gunicorn worker) ended: drop its live gauges."""
    path = multiprocess_dir()
    if path is not None:
        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


# -- recording -----------------------------------------------------------------------------


def _code_label(code: int | None) -> str:
    return str(code) if code is not None and 100 <= code <= 599 else "none"


def callback_received(code: int | None, outcome: str) -> None:
    _callbacks_received(_code_label(code), outcome).inc()


@functools.cache
def _callbacks_received(code: str, outcome: str) -> Any:
    # One labelled child per (code, outcome), looked up once: both come from small fixed sets.
    return metrics().callbacks_received.labels(code, outcome)


def callback_applied(code: int, outcome: str) -> None:
    metrics().callbacks_applied.labels(_code_label(code), outcome).inc()


def resume_started(received_at: float, now: float | None = None) -> None:
    elapsed = (time.time() if now is None else now) - received_at
    metrics().callback_resume_seconds.observe(max(elapsed, 0.0))


_R = TypeVar("_R")


def timed_apsis_call(endpoint: str, send: Callable[[], _R]) -> _R:
    """Run ``send`` (one HTTP call to APSIS), counting it by its status and timing it."""
    m = metrics()
    started = time.monotonic()
    status = "error"
    try:
        response = send()
        status = str(getattr(response, "status_code", "error"))
        return response
    finally:
        m.apsis_requests.labels(endpoint, status).inc()
        m.apsis_request_seconds.labels(endpoint).observe(time.monotonic() - started)


def rate_limit_answer(kind: str, *, granted: bool, wait: float) -> None:
    m = metrics()
    if granted:
        m.ratelimit_wait_seconds.labels(kind).observe(wait)
    else:
        m.ratelimit_denied.labels(kind).inc()


def retry_scheduled() -> None:
    metrics().retries.inc()


def rerequested() -> None:
    metrics().rerequests.inc()


def bytes_stored(count: int) -> None:
    metrics().stored_bytes.inc(count)


def job_ended(state: str) -> None:
    metrics().jobs_ended.labels(state).inc()


def batch_ended(state: str) -> None:
    metrics().batches_ended.labels(state).inc()


def batch_rescued() -> None:
    metrics().batches_rescued.inc()


def messages_restored(reason: str, count: int) -> None:
    metrics().messages_restored.labels(reason).inc(count)


# -- the counters and histograms of every process -----------------------------------------


class _Delegate(Collector):
    """Collects another registry (the single-process metrics) into the scrape registry."""

    def __init__(self, source: CollectorRegistry) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        yield from self._source.collect()


def counters_registry() -> CollectorRegistry:
    """A registry holding every process's counters and histograms (no pool gauges yet)."""
    registry = CollectorRegistry(auto_describe=False)
    path = multiprocess_dir()
    if path is not None:
        multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    else:
        registry.register(_Delegate(metrics().registry))
    return registry
