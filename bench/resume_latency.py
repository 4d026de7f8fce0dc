"""Resume latency: from the webhook recording a "ready" callback to the fetch task starting.

Run: python -m bench.resume_latency [jobs] [per_second]. Beside it, in the same run, on the
same Redis and worker: plain Celery dispatch (send_task to task start) of ``bench.noop``,
sent at the same pace, interleaved with the exports. Both are paced well under the pool's
capacity, so the figures are the machinery's latency, not queueing.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from bench.report import (
    BENCH_TASKS_ENV,
    bench_stack,
    counts,
    emit,
    redis_of,
    summary_ms,
    wait_until,
)
from bench.tasks import NOOP_LATENCIES

JOBS = 1000
#: Exports (and as many no-op tasks) submitted per second.
PER_SECOND = 10.0
WARMUP = 20
#: Plain dispatch p95 above this many ms means the pool was saturated (queueing, not latency).
SATURATED_MS = 100.0
#: The goal: the export side's p99 within this factor of plain dispatch's.
GOAL_RATIO = 1.5


def main(jobs: int = JOBS, per_second: float = PER_SECOND) -> dict[str, Any]:
    with bench_stack(env=BENCH_TASKS_ENV) as stack:
        client = redis_of(stack)
        try:
            # Warm-up: token cached, connections open, every pool process has run each task.
            for n in range(WARMUP):
                stack.submit(f"warm-{n}@example.com", include_merged_profiles=False)
                _send_noop(stack)
            wait_until(lambda: counts(client).get("done", 0) >= WARMUP, timeout=60, what="warm-up")
            wait_until(lambda: client.llen(NOOP_LATENCIES) >= WARMUP, timeout=30, what="noop")
            client.delete(NOOP_LATENCIES)

            period = 1.0 / per_second
            job_ids: list[str] = []
            start = time.monotonic()
            for n in range(jobs):
                tick = start + n * period
                _sleep_until(tick)
                job_ids.append(stack.submit(f"resume-{n}@example.com"))
                _sleep_until(tick + period / 2)
                _send_noop(stack)
            wait_until(
                lambda: counts(client).get("done", 0) >= WARMUP + jobs,
                timeout=120,
                what="all exports done",
            )
            wait_until(lambda: client.llen(NOOP_LATENCIES) >= jobs, timeout=30, what="noops")

            pipe = client.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hmget(f"apsis:job:{job_id}", "ready_received_at", "fetch_started_at")
            resume = [float(b) - float(a) for a, b in pipe.execute() if a and b]
            raw: Any = client.lrange(NOOP_LATENCIES, 0, -1)
            dispatch = [float(v) for v in raw]
        finally:
            client.close()

    resumed, plain = summary_ms(resume), summary_ms(dispatch)
    ratio = resumed["p99_ms"] / plain["p99_ms"]
    rows = [
        {"path": "ready callback -> fetch task start", **resumed},
        {"path": "send_task -> task start (floor)", **plain},
    ]
    verdict = "met" if ratio <= GOAL_RATIO else "MISSED"
    summary = (
        f"resume_latency: p99 {resumed['p99_ms']:.1f} ms vs plain dispatch "
        f"{plain['p99_ms']:.1f} ms = {ratio:.2f}x (goal <= {GOAL_RATIO}x: {verdict}); "
        f"{jobs} jobs at {per_second:g}/s"
    )
    if plain["p95_ms"] > SATURATED_MS:
        # Plain dispatch itself queued: the pool (or the machine) was saturated, so both
        # sides measured queueing, not the machinery. Run again slower or on a quiet machine.
        summary += f" [plain p95 {plain['p95_ms']:.0f} ms: saturated, rerun slower]"
    return emit(
        "resume_latency",
        rows,
        summary,
        p99_ratio=round(ratio, 2),
        goal_met=ratio <= GOAL_RATIO,
        jobs=jobs,
        per_second=per_second,
    )


def _send_noop(stack: Any) -> None:
    stack.producer.send_task("bench.noop", args=[time.time()], queue="apsis")


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


if __name__ == "__main__":
    argv = sys.argv[1:]
    main(
        int(argv[0]) if argv else JOBS,
        float(argv[1]) if len(argv) > 1 else PER_SECOND,
    )
