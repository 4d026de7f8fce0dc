"""A pool child replaced after the main process wrote to storage still stores its exports.

obstore's runtime does not survive fork(): if a worker's main process ever does storage I/O
(a retention deletion, a failure manifest for a job failed by a callback), every pool child
Celery forks afterwards hangs on its first upload, with a lease that keeps beating. Here
one worker with one pool process: a job is deleted under retention and another fails on
APSIS's callbacks (the two kinds of storage work the main process used to do), then the
pool process alone is SIGKILLed (as an OOM kill would) and the next export must be stored
by its replacement, with no watchdog rescue and no storage I/O refused anywhere.

    .venv/bin/pytest tests/integration/test_fault_pool_child.py -q -s -p no:cacheprovider
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import redis
from e2e_support import StackFactory, log_events, wait_final, wait_for

from worker.deliverable import manifest
from worker.deliverable.storage import Storage
from worker.flow.retention import DAY_SECONDS, deletion_object
from worker.model.jobs import JobStore, State

pytestmark = [pytest.mark.integration, pytest.mark.faults]

ENV = {
    "WATCHDOG_INTERVAL": "1",
    "WATCHDOG_STUCK_AFTER": "5",
    "RETENTION_DAYS": "1",
    "LOG_LEVEL": "INFO",
}
#: Seconds the export after the kill may take (it takes about one when nothing hangs).
AFTER_KILL_TIMEOUT = 30.0
FAILING_KEY = "failing@example.com"


def pool_children(parent: int) -> set[int]:
    """Pids of the processes whose parent is ``parent`` (a worker's pool)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its ")".
        if int(stat.rpartition(")")[2].split()[1]) == parent:
            found.add(int(entry.name))
    return found


def test_a_replaced_pool_child_stores_the_next_export(
    make_stack: StackFactory, redis_db: redis.Redis, tmp_path: Path
) -> None:
    stack = make_stack(workers=1, concurrency=1, env=ENV)
    stack.sandbox_put("/_sandbox/faults", {"keys": {FAILING_KEY: {"failure_code": 410}}})
    jobs = JobStore(redis_db)
    storage = Storage(stack.env["STORAGE_URL"])
    main = stack.worker_processes[0]
    started = time.monotonic()

    # 1. The main process has storage work to do: a job past its retention period ...
    old = stack.submit("old@example.com")
    (job,) = wait_final(jobs, [old])
    assert job.state == State.DONE
    redis_db.zadd(jobs.finished_key, {jobs.key(old): time.time() - 2 * DAY_SECONDS})
    wait_for("the retention deletion", lambda: storage.exists(deletion_object(old)))
    # ... and a job failed by APSIS's callbacks (the inbox consumer fails it).
    failing = stack.submit(FAILING_KEY)
    (job,) = wait_final(jobs, [failing])
    assert job.state == State.FAILED, job.error
    wait_for("the failure manifest", lambda: storage.exists(manifest.manifest_object(failing)))
    failure = json.loads(storage.get_bytes(manifest.manifest_object(failing)))
    assert failure["state"] == "failed"

    # 2. The pool process alone dies (an OOM kill); Celery forks a replacement.
    (child,) = wait_for("the pool process", lambda: pool_children(main.pid))
    os.kill(child, signal.SIGKILL)
    (replacement,) = wait_for(
        "a replacement pool process", lambda: pool_children(main.pid) - {child}
    )

    # 3. The next export is fetched and stored by the replacement.
    killed_at = time.monotonic()
    new = stack.submit("new@example.com")
    (job,) = wait_final(jobs, [new], timeout=AFTER_KILL_TIMEOUT)
    after_kill = time.monotonic() - killed_at
    assert job.state == State.DONE, job.error
    stored = json.loads(storage.get_bytes(manifest.manifest_object(new)))
    assert stored["state"] == "done"
    assert main.poll() is None
    assert pool_children(main.pid) == {replacement}

    rescues = log_events(stack.log_dir, "watchdog")
    refused = log_events(stack.log_dir, "storage_io_refused")
    stalled = log_events(stack.log_dir, "stalled")
    print(
        "\npool child replaced after the main process's storage work:"
        f"\n  retention deletion and failure manifest stored: yes"
        f"\n  pool process {child} SIGKILLed, replaced by {replacement}"
        f"\n  next export done {after_kill:.1f} s after the kill"
        f"\n  watchdog rescues: {len(rescues)}, storage I/O refused: {len(refused)},"
        f" stalled steps: {len(stalled)}"
        f"\n  whole test: {time.monotonic() - started:.1f} s"
    )
    assert rescues == []
    assert refused == []
    assert stalled == []
