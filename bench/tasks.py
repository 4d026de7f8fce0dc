"""A task that does nothing but note its own dispatch latency: plain Celery's floor.

Loaded by the worker only when CELERY_EXTRA_INCLUDE names ``bench.tasks``.
"""

from __future__ import annotations

import time

from celery import shared_task

from worker.flow.runtime import get_runtime

#: The Redis list each run appends its latency to (seconds from send_task to start).
NOOP_LATENCIES = "bench:noop:latency"


@shared_task(name="bench.noop")
def noop(sent_at: float) -> None:
    started = time.time()
    get_runtime().redis.rpush(NOOP_LATENCIES, repr(started - sent_at))
