"""Redis restarts under load: task messages lost, requeued, left unsettled; workers crashed.

Run: python -m bench.redis_restarts [EXPORTS] [RESTARTS]. Three workers (concurrency 2)
take EXPORTS exports sent with send_task while Redis (AOF on) is stopped with SIGTERM and
started again RESTARTS times, 3 s apart. Then it waits until every job is recorded (or
150 s) and prints what happened, from the job store, the queue and the workers' logs.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import redis
import requests

from worker.cli.stack import LocalStack, queued_task_ids, retrying, unacked_task_ids
from worker.model.jobs import JobStore

ENV = {
    "APSIS_EXPORT_RATE": "400",
    "APSIS_DOWNLOAD_RATE": "24000",
    "APSIS_TOKEN_RATE": "600",
    "CELERY_VISIBILITY_TIMEOUT": "30",
    "DOWNLOAD_TIMEOUT": "20",  # no fetch may outlive the visibility timeout (worker/config.py)
    "WATCHDOG_INTERVAL": "1",
    "LOG_LEVEL": "INFO",
}
SANDBOX = {
    "limits": {"export": [1000, 1.0], "download": [1000, 1.0], "token": [1000, 60.0]},
    "callback_retries": 12,
    "callback_backoff": 0.5,
}


def main(exports: int = 1500, restarts: int = 6) -> None:
    logs = Path(tempfile.mkdtemp(prefix="bench-restarts-"))
    stack = LocalStack(
        redis_url="",
        redis_appendonly=True,
        storage_url=f"file://{logs}/exports",
        workers=3,
        concurrency=2,
        env=ENV,
        log_dir=logs,
    )
    with stack:
        requests.patch(f"{stack.apsis_url}/_sandbox/config", json=SANDBOX, timeout=5)
        client = redis.Redis.from_url(stack.redis_url, socket_timeout=5)
        ids = [f"r{n:05d}".ljust(32, "0") for n in range(exports)]
        for job_id in ids:
            retrying(lambda j=job_id: stack.submit(f"{j}@example.com", job_id=j), attempts=60)
        started = time.monotonic()
        for _ in range(restarts):
            time.sleep(2.0)
            stack.restart_redis(down_for=1.0)
        jobs = JobStore(client)
        missing = ids
        deadline = time.monotonic() + 150
        while missing and time.monotonic() < deadline:
            missing = [
                j for j in missing if retrying(lambda j=j: jobs.find(j), attempts=60) is None
            ]
            time.sleep(1.0)
        recorded_in = time.monotonic() - started
        queued = set(queued_task_ids(client))
        unacked = set(unacked_task_ids(client).values())
        waiting = [j for j in missing if stack.task_ids[j] in queued | unacked]
        text = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*.log"))
        crashed = text.count("Unrecoverable error")
        requeued = sum(
            int(part.split("=")[1])
            for line in text.splitlines()
            if "requeued_messages=" in line
            for part in json.loads(line)["reason"].split()
            if part.startswith("requeued_messages=")
        )
    print(f"redis restarts under load: {exports} exports, {restarts} restarts (SIGTERM, AOF)")
    print(f"  jobs recorded: {exports - len(missing)} of {exports} ({recorded_in:.0f} s)")
    print(f"  lost (not recorded, message nowhere): {len(missing) - len(waiting)}")
    print(f"  not yet recorded, message queued or unacknowledged: {len(waiting)}")
    print(f"  messages requeued from in flight: {requeued}")
    print(f"  acks/rejects Redis did not get (slot freed): {text.count('unsettled_message')}")
    print(f"  workers that exited (Unrecoverable error): {crashed}")
    print(f"  logs: {logs}")


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    main(*args)
