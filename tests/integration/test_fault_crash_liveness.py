"""A worker node killed mid-fetch: its job is back on the road within a lease, not a sweep.

The fetch's lease beats every 10 s and lapses 30 s after its holder dies; the next sweep
(WATCHDOG_INTERVAL, 5 s here) sends the fetch again. Before, the job waited for
WATCHDOG_STUCK_AFTER (300 s) or the broker's visibility timeout.
"""

from __future__ import annotations

import time

import pytest
import redis
from e2e_support import StackFactory, wait_final
from fault_support import BIG_FILE_BYTES, leased_jobs

from worker.model.jobs import JobStore, State
from worker.model.lease import LEASE_SECONDS

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def test_a_fetch_whose_worker_was_killed_resumes_within_a_minute(
    make_stack: StackFactory, redis_db: redis.Redis
) -> None:
    stack = make_stack(workers=1, concurrency=1, env={"WATCHDOG_INTERVAL": "5"})
    keys = [f"crash-{n}@example.com" for n in range(4)]
    stack.sandbox_put(
        "/_sandbox/faults", {"keys": {k: {"file_size": BIG_FILE_BYTES} for k in keys}}
    )
    job_ids = [stack.submit(key) for key in keys]

    deadline = time.monotonic() + 60
    while not (held := leased_jobs(redis_db) & set(job_ids)):
        assert time.monotonic() < deadline, "no fetch started"
        time.sleep(0.005)
    victim = next(iter(held))
    stack.kill_worker(stack.worker_processes[0])
    killed_at = time.time()
    jobs = JobStore(redis_db)
    assert jobs.get(victim).state == State.READY  # the kill landed mid-fetch
    stack.add_worker()

    final = wait_final(jobs, job_ids, timeout=120)
    assert {job.state for job in final} == {State.DONE}
    resumed = jobs.get(victim)
    took = resumed.updated_at - killed_at
    print(
        f"\nfetch of a killed worker done {took:.1f} s after the kill "
        f"(lease {LEASE_SECONDS} s + sweep every 5 s)"
    )
    assert took <= 60
