"""The pool's gauges, read from Redis at scrape time, and the two places that serve them.

Every target (each worker's metrics port, the webhook's ``/metrics``) reports the same
pool-wide values: jobs by state, the oldest waiting job, the nearest deadline, the inbox
backlog and its live consumers, unfinished batches. They are read through the stores'
public methods; the counters and histograms come from ``worker.telemetry.metrics``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from worker.model.batch_store import BatchStore
from worker.model.inbox import HEARTBEAT_FRESH_SECONDS, Inbox
from worker.model.jobs import JobStore
from worker.model.line import FETCH_PREFIX, LANES, DispatchLine
from worker.telemetry.metrics import JOB_STATES, PREFIX, counters_registry

log = logging.getLogger("apsis.metrics")

#: Batches whose progress one scrape sums (running batches only; more are unusual).
MAX_BATCHES_SCRAPED = 1000
#: Seconds ahead counted as "due soon" by apsis_export_jobs_due_soon.
DUE_SOON_SECONDS = 24 * 3600


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
        now = self._now()
        jobs = JobStore(self._client)

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

        nearest = jobs.nearest_deadlines(1)
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
        due.add_metric([], jobs.due_before(now + DUE_SOON_SECONDS))
        yield due

        inbox = Inbox(self._client)
        backlog = GaugeMetricFamily(
            PREFIX + "inbox_backlog", "Callbacks recorded and not yet applied (XLEN)."
        )
        backlog.add_metric([], inbox.backlog())
        yield backlog

        consumers = GaugeMetricFamily(
            PREFIX + "inbox_consumers",
            f"Inbox consumers with a heartbeat in the last {HEARTBEAT_FRESH_SECONDS:g} s.",
        )
        consumers.add_metric([], inbox.live_consumer_count(now))
        yield consumers

        yield from self._batch_gauges(BatchStore(self._client, jobs))
        yield from self._line_gauges(DispatchLine(self._client), now, "line", "Export requests")
        yield from self._line_gauges(
            DispatchLine(self._client, prefix=FETCH_PREFIX), now, "download_line", "Fetches"
        )

    def _line_gauges(
        self, line: DispatchLine, now: float, name: str, what: str
    ) -> Iterator[Metric]:
        waiting = GaugeMetricFamily(
            PREFIX + name + "_requests",
            f"{what} waiting in an account's dispatch line, by lane ('later': waiting for "
            "a retry).",
            labels=["account", "lane"],
        )
        oldest = GaugeMetricFamily(
            PREFIX + name + "_oldest_seconds",
            "Age of the one that has waited longest in a lane (0: the lane is empty).",
            labels=["account", "lane"],
        )
        for row in line.summary():
            waiting.add_metric([row.account, row.lane], row.waiting)
            if row.lane in LANES:
                since = row.oldest_since
                oldest.add_metric([row.account, row.lane], max(now - since, 0.0) if since else 0.0)
        yield waiting
        yield oldest

    def _batch_gauges(self, store: BatchStore) -> Iterator[Metric]:
        by_batch_state: dict[str, int] = {}
        progress = {"done": 0, "failed": 0, "in_flight": 0, "waiting": 0}
        for batch in store.many(store.running_ids(MAX_BATCHES_SCRAPED)):
            by_batch_state[batch.state] = by_batch_state.get(batch.state, 0) + 1
            progress["done"] += batch.done
            progress["failed"] += batch.failed
            progress["in_flight"] += max(batch.in_flight, 0)
            progress["waiting"] += batch.waiting
        by_state = GaugeMetricFamily(
            PREFIX + "batches", "Unfinished batches by state.", labels=["state"]
        )
        for state in sorted({"running", *by_batch_state}):
            by_state.add_metric([state], by_batch_state.get(state, 0))
        yield by_state
        jobs = GaugeMetricFamily(
            PREFIX + "batch_jobs",
            "Jobs of unfinished batches: done, failed, in flight, waiting to be sent.",
            labels=["state"],
        )
        for state, count in progress.items():
            jobs.add_metric([state], count)
        yield jobs


def scrape_registry(client: redis.Redis | None) -> CollectorRegistry:
    """A registry holding every process's counters and histograms plus the pool gauges."""
    registry = counters_registry()
    if client is not None:
        registry.register(PoolCollector(client))
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

        registry = counters_registry()
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
