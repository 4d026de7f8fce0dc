"""One road to APSIS, through real processes, at the documented limits' shape.

The sandbox runs as a process of its own and enforces APSIS's limits scaled up by the same
factor (export requests per second, downloads and token requests per minute), so a run stays
short while every ratio a user meets holds. Nothing here may be saved by the watchdog: its
sweeps run every 2 s and every one that acts is counted and must be zero.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
import redis
from e2e_support import (
    SCALE,
    StackFactory,
    stack_at_limits,
    wait_final,
    watchdog_rescues,
)

from worker.model.jobs import JobStore, State

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def _task_runs(log_dir: Path, name: str) -> int:
    """How many times the workers received a task of this name (each retry is one more)."""
    return sum(
        line.count(f"Task {name}[") and line.count("received")
        for path in log_dir.glob("worker-*.log")
        for line in path.read_text(errors="replace").splitlines()
    )


def _rate(stamps: list[float]) -> float:
    stamps = sorted(stamps)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def test_a_burst_of_60_singles_leaves_at_the_quota_through_429s_and_503s(
    make_stack: StackFactory, redis_db: redis.Redis, tmp_path: Path
) -> None:
    scale = SCALE
    stack = stack_at_limits(make_stack, scale=scale)
    keys = [f"single-{n:02d}@example.com" for n in range(60)]
    faulted = {
        **{k: {"export_errors": [{"status": 429, "retry_after": 1}]} for k in keys[5:15]},
        **{k: {"export_errors": [503, 503]} for k in keys[20:30]},
    }
    stack.sandbox_put("/_sandbox/faults", {"keys": faulted})
    for n, key in enumerate(keys):
        stack.producer.send_task(
            "apsis.export_profile", args=[key], kwargs={"job_id": f"burst-{n:02d}"}, queue="apsis"
        )

    timeout = 120 * 10 / scale
    jobs = wait_final(JobStore(redis_db), [f"burst-{n:02d}" for n in range(60)], timeout=timeout)

    assert Counter(job.state for job in jobs) == {State.DONE: 60}
    exports = [e for e in stack.journal() if e["kind"] == "export"]
    accepted = Counter(e["export_key"] for e in exports if e["status"] == 202)
    assert accepted == dict.fromkeys(keys, 1)  # each key requested (and accepted) once
    refused = [e for e in exports if e["status"] == 429 and e["export_key"] not in faulted]
    assert refused == []  # no 429 from our own pacing
    # While the line held more than a slot's worth, requests left at the quota.
    burst = sorted(e["ts"] for e in exports)[:50]
    achieved = _rate(burst)
    rescues = watchdog_rescues(stack.log_dir)
    print(
        f"\n60 singles at {scale:g}x the documented limits: {achieved:.2f} requests/s of "
        f"{scale:g} allowed ({100 * achieved / scale:.1f}%) over the first 50; "
        f"{len(exports)} export requests; 429s from pacing: {len(refused)}; "
        f"watchdog rescues: {len(rescues)}"
    )
    assert achieved >= 0.95 * scale
    assert achieved <= scale
    assert rescues == []


def test_singles_sent_during_a_long_batch_leave_within_ten_slots(
    make_stack: StackFactory, redis_db: redis.Redis
) -> None:
    scale = max(SCALE // 2, 1)
    stack = stack_at_limits(make_stack, scale=scale)
    total = 60 * scale  # the batch runs for a minute at the enforced rate
    keys = [f"long-{n:03d}@example.com" for n in range(total)]
    stack.producer.send_task(
        "apsis.export_batch",
        args=[keys],
        kwargs={"batch_id": "longbatch", "include_merged_profiles": False},
        queue="apsis",
    )
    time.sleep(10)
    enqueued: dict[str, float] = {}
    for n in range(5):
        key = f"meanwhile-{n}@example.com"
        enqueued[key] = time.time()
        stack.producer.send_task(
            "apsis.export_profile", args=[key], kwargs={"job_id": f"meanwhile-{n}"}, queue="apsis"
        )
        time.sleep(0.5)

    wait_final(JobStore(redis_db), [f"meanwhile-{n}" for n in range(5)], timeout=60)
    deadline = time.monotonic() + 180
    while not redis_db.hget("apsis:batch:longbatch", "finished_at"):
        assert time.monotonic() < deadline, "the batch did not finish"
        time.sleep(0.5)
    raw: dict[bytes, bytes] = redis_db.hgetall("apsis:batch:longbatch")  # type: ignore[assignment]
    batch = {k.decode(): v.decode() for k, v in raw.items()}
    assert (batch["state"], batch["done"], batch["failed"]) == ("done", str(total), "0")

    slot = 1.0 / (scale * (1 - 0.045))
    exports = [e for e in stack.journal() if e["kind"] == "export" and e["status"] == 202]
    waited = {
        e["export_key"]: e["ts"] - enqueued[e["export_key"]]
        for e in exports
        if e["export_key"] in enqueued
    }
    print(
        "\nsingles during a batch, seconds from send_task to APSIS: "
        + ", ".join(f"{w:.2f}" for w in waited.values())
        + f" (10 slots = {10 * slot:.2f} s)"
    )
    assert len(waited) == 5
    assert max(waited.values()) <= 10 * slot
    assert watchdog_rescues(stack.log_dir) == []


def test_a_batch_whose_requests_outpace_the_download_limit_downloads_at_it(
    make_stack: StackFactory, redis_db: redis.Redis
) -> None:
    """Export requests at 5x the download rate (APSIS_EXPORT_RATE=5 against the documented
    60 downloads/min, both x scale): ready exports pile up faster than they may be fetched.
    They wait in the download line and leave at its rate; none is lost to a retry limit,
    none is rescued by the watchdog, APSIS never answers 429 to a download."""
    scale = max(SCALE // 5, 1)  # downloads slow enough (2/s in `make test`) to pile up
    stack = stack_at_limits(
        make_stack, scale=scale, exports_per_second=5, env={"LOG_LEVEL": "DEBUG"}
    )
    export, download = 5 * scale, 60 * scale
    total = 45
    keys = [f"outpace-{n:02d}@example.com" for n in range(total)]
    stack.producer.send_task(
        "apsis.export_batch",
        args=[keys],
        kwargs={"batch_id": "outpace", "include_merged_profiles": False, "max_in_flight": total},
        queue="apsis",
    )
    timeout = 60 + 2 * total * 60 / download
    jobs = wait_final(JobStore(redis_db), [f"outpace.{n}" for n in range(total)], timeout=timeout)

    assert Counter(job.state for job in jobs) == {State.DONE: total}
    downloads = [e for e in stack.journal() if e["kind"] == "download"]
    refused = [e for e in downloads if e["status"] == 429]
    fetched = Counter(e["path"] for e in downloads if e["status"] == 200)
    achieved = _rate([e["ts"] for e in downloads if e["status"] == 200][5:])
    rescues = watchdog_rescues(stack.log_dir)
    runs = _task_runs(stack.log_dir, "apsis.fetch_export")
    print(
        f"\n{total} exports requested at {export}/s, downloaded at {achieved * 60:.1f}/min of "
        f"{download} allowed ({100 * achieved * 60 / download:.1f}%); download 429s: "
        f"{len(refused)}; fetch task runs: {runs}; watchdog rescues: {len(rescues)}"
    )
    # Waiting for a download slot happens in the line, not in a herd of retrying tasks.
    # (Celery logs each task it receives at DEBUG, which this stack runs at.)
    assert total <= runs <= total + 2
    assert refused == []
    assert len(fetched) == total and set(fetched.values()) == {1}  # each file fetched once
    assert achieved * 60 <= download
    assert rescues == []
