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
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import redis
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

log = logging.getLogger("apsis.metrics")

#: The environment variable prometheus-client reads to switch to multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Every metric's name starts with this.
PREFIX = "apsis_export_"
#: The content type of ``render()``'s answer.
CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Batches whose progress one scrape sums (running batches only; more are unusual).
MAX_BATCHES_SCRAPED = 1000
#: Seconds ahead counted as "due soon" by apsis_export_jobs_due_soon.
DUE_SOON_SECONDS = 24 * 3600
#: Seconds an inbox consumer's heartbeat counts as alive (see worker.flow.consumer).
HEARTBEAT_FRESH_SECONDS = 30.0
#: Sorted set of inbox consumers scored by their last heartbeat (unix seconds).
HEARTBEATS_KEY = "apsis:heartbeats"

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
    metrics().callbacks_received.labels(_code_label(code), outcome).inc()


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


# -- scraping ------------------------------------------------------------------------------


class PoolCollector(Collector):
    """Pool-wide gauges read from Redis at scrape time (the same on every target)."""

    def __init__(self, client: redis.Redis, *, now: Callable[[], float] = time.time) -> None:
        self._client = client
        self._now = now

    def describe(self) -> Iterable[Metric]:
        return []  # read at scrape time: nothing to describe ahead

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(PREFIX + "redis_up", "1 if Redis answered this scrape.")
        try:
            found = list(self._pool_gauges())
        except redis.RedisError as exc:
            log.warning("metrics: redis unavailable", extra={"reason": type(exc).__name__})
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from found

    def _pool_gauges(self) -> Iterator[Metric]:
        # Imported here: worker.model.jobs records metrics itself (it imports this module).
        from worker.flow.batches import RUNNING_KEY
        from worker.model.inbox import STREAM
        from worker.model.jobs import JobStore

        client = self._client
        now = self._now()
        jobs = JobStore(client)

        by_state = GaugeMetricFamily(
            PREFIX + "jobs", "Jobs by state (pool-wide, from Redis).", labels=["state"]
        )
        counts = jobs.counts()
        for state in JOB_STATES:
            by_state.add_metric([state], max(counts.get(state, 0), 0))
        yield by_state

        oldest = jobs.oldest_waiting()
        waiting = GaugeMetricFamily(
            PREFIX + "oldest_waiting_seconds",
            "Age of the job that has waited longest for APSIS's callback (0: none waiting).",
        )
        waiting.add_metric([], max(now - oldest, 0.0) if oldest is not None else 0.0)
        yield waiting

        nearest: list[tuple[bytes, float]] = client.zrange(  # type: ignore[assignment]
            jobs.deadlines_key, 0, 0, withscores=True
        )
        deadline = GaugeMetricFamily(
            PREFIX + "deadline_nearest_seconds",
            "Seconds until the nearest unfinished job's deadline (negative: overdue; "
            "absent: no unfinished job).",
        )
        if nearest:
            deadline.add_metric([], nearest[0][1] - now)
        yield deadline
        due = GaugeMetricFamily(
            PREFIX + "jobs_due_soon",
            f"Unfinished jobs whose deadline is within {DUE_SOON_SECONDS} s (or past).",
        )
        due.add_metric([], int(client.zcount(jobs.deadlines_key, "-inf", now + DUE_SOON_SECONDS)))
        yield due

        backlog = GaugeMetricFamily(
            PREFIX + "inbox_backlog", "Callbacks recorded and not yet applied (XLEN)."
        )
        backlog.add_metric([], int(client.xlen(STREAM)))
        yield backlog

        consumers = GaugeMetricFamily(
            PREFIX + "inbox_consumers",
            f"Inbox consumers with a heartbeat in the last {HEARTBEAT_FRESH_SECONDS:g} s.",
        )
        alive = client.zcount(HEARTBEATS_KEY, now - HEARTBEAT_FRESH_SECONDS, "+inf")
        consumers.add_metric([], int(alive))
        yield consumers

        yield from self._batch_gauges(RUNNING_KEY)

    def _batch_gauges(self, running_key: str) -> Iterator[Metric]:
        client = self._client
        ids: list[bytes] = client.zrange(running_key, 0, MAX_BATCHES_SCRAPED - 1)  # type: ignore[assignment]
        pipe = client.pipeline(transaction=False)
        for batch_id in ids:
            pipe.hmget(f"apsis:batch:{batch_id.decode()}", "state", "total", "submitted")
            pipe.hmget(f"apsis:batch:{batch_id.decode()}", "done", "failed")
        answers: list[Any] = pipe.execute() if ids else []
        batches: dict[str, int] = {}
        progress = {"done": 0, "failed": 0, "in_flight": 0, "waiting": 0}
        for head, ends in zip(answers[::2], answers[1::2], strict=True):
            state = (head[0] or b"unknown").decode()
            batches[state] = batches.get(state, 0) + 1
            total, submitted = int(head[1] or 0), int(head[2] or 0)
            done, failed = int(ends[0] or 0), int(ends[1] or 0)
            progress["done"] += done
            progress["failed"] += failed
            progress["in_flight"] += max(submitted - done - failed, 0)
            progress["waiting"] += max(total - submitted, 0) if state == "running" else 0
        by_state = GaugeMetricFamily(
            PREFIX + "batches", "Unfinished batches by state.", labels=["state"]
        )
        for state in sorted({"running", *batches}):
            by_state.add_metric([state], batches.get(state, 0))
        yield by_state
        jobs = GaugeMetricFamily(
            PREFIX + "batch_jobs",
            "Jobs of unfinished batches: done, failed, in flight, waiting to be sent.",
            labels=["state"],
        )
        for state, count in progress.items():
            jobs.add_metric([state], count)
        yield jobs


class _Delegate(Collector):
    """Collects another registry (the single-process metrics) into the scrape registry."""

    def __init__(self, source: CollectorRegistry) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        yield from self._source.collect()


def scrape_registry(client: redis.Redis | None) -> CollectorRegistry:
    """A registry holding every process's counters and histograms plus the pool gauges."""
    registry = _counters_registry()
    if client is not None:
        registry.register(PoolCollector(client))
    return registry


def _counters_registry() -> CollectorRegistry:
    """A registry holding every process's counters and histograms (no pool gauges yet)."""
    registry = CollectorRegistry(auto_describe=False)
    path = multiprocess_dir()
    if path is not None:
        multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    else:
        registry.register(_Delegate(metrics().registry))
    return registry


def render(client: redis.Redis | None) -> bytes:
    """The text exposition format of ``scrape_registry(client)``."""
    return generate_latest(scrape_registry(client))


# -- the worker's metrics port ---------------------------------------------------------------


class MetricsServer:
    """Serves ``/metrics`` from a thread of the worker's main process."""

    def __init__(self, port: int, client_factory: Callable[[], redis.Redis], *, host: str) -> None:
        self.port = port
        self.host = host
        self._client_factory = client_factory
        self._server: Any = None

    def start(self) -> bool:
        """Start serving; False (and a warning, the worker goes on) if the port is taken."""
        from prometheus_client import start_http_server

        registry = _counters_registry()
        registry.register(_LazyPool(self._client_factory))
        try:
            server, _thread = start_http_server(self.port, addr=self.host, registry=registry)
        except OSError as exc:
            log.warning(
                "metrics port unavailable; this worker serves no metrics",
                extra={"reason": f"{type(exc).__name__} on port {self.port}"},
            )
            return False
        self._server = server
        self.port = int(server.server_address[1])
        log.info("serving metrics", extra={"event": "metrics_port", "status": self.port})
        return True

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _LazyPool(Collector):
    """The pool gauges on a Redis client built at the first scrape (not at worker start)."""

    def __init__(self, client_factory: Callable[[], redis.Redis]) -> None:
        self._client = functools.cache(client_factory)

    def collect(self) -> Iterator[Metric]:
        yield from PoolCollector(self._client()).collect()
