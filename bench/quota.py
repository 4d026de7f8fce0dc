"""Quota utilisation: achieved export requests/s over the allowed rate, and 429s, by pool size.

Run: python -m bench.quota. The sandbox enforces a scaled-down export limit (20 requests
per second, "at most N in any trailing second", as APSIS counts); the pool is told the
same rate (APSIS_EXPORT_RATE) and runs one batch per pool size.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import redis
import requests

from worker.cli.stack import LocalStack

#: The scaled-down limit the sandbox enforces, in export requests per second.
ALLOWED = 20
#: Exports per pool size (about 15 s of requests each at the allowed rate).
BATCH = 300
POOLS = (1, 2, 4)


def run_pool(processes: int, *, batch: int = BATCH) -> dict[str, Any]:
    """One batch through a pool of ``processes`` single-slot worker nodes."""
    env = {"APSIS_EXPORT_RATE": str(ALLOWED), "APSIS_DOWNLOAD_RATE": "60000"}
    with LocalStack(
        redis_url="",
        storage_url="memory:///",
        workers=processes,
        concurrency=1,
        env=env,
    ) as stack:
        limits = {"limits": {"export": [ALLOWED, 1.0], "download": None}}
        requests.patch(f"{stack.apsis_url}/_sandbox/config", json=limits, timeout=5)
        keys = [f"quota-{processes}-{n}@example.com" for n in range(batch)]
        stack.producer.send_task(
            "apsis.export_batch",
            args=[keys],
            kwargs={"batch_id": f"quota{processes}", "include_merged_profiles": False},
            queue="apsis",
        )
        client = redis.Redis.from_url(stack.redis_url)
        deadline = time.monotonic() + batch / ALLOWED * 3 + 60
        while not client.hget(f"apsis:batch:quota{processes}", "finished_at"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"pool of {processes}: batch not finished in time")
            time.sleep(0.25)
        journal = stack.journal()
        client.close()
    accepted = sorted(e["ts"] for e in journal if e["kind"] == "export" and e["status"] == 202)
    refused = sum(1 for e in journal if e["status"] == 429)
    achieved = (len(accepted) - 1) / (accepted[-1] - accepted[0])
    return {
        "processes": processes,
        "exports": len(accepted),
        "achieved": round(achieved, 2),
        "allowed": ALLOWED,
        "utilisation": round(achieved / ALLOWED, 3),
        "429s": refused,
    }


def main(pools: tuple[int, ...] = POOLS) -> dict[str, Any]:
    rows = [run_pool(n) for n in pools]
    print(
        f"{'processes':>9}  {'exports':>7}  {'achieved/s':>10}  {'allowed/s':>9}  "
        f"{'utilisation':>11}  {'429s':>4}"
    )
    for r in rows:
        print(
            f"{r['processes']:>9}  {r['exports']:>7}  {r['achieved']:>10.2f}  "
            f"{r['allowed']:>9}  {100 * r['utilisation']:>10.1f}%  {r['429s']:>4}"
        )
    worst = min(r["utilisation"] for r in rows)
    total_429 = sum(r["429s"] for r in rows)
    print(
        f"quota: worst utilisation {100 * worst:.1f}% of the allowed rate, {total_429} 429s "
        f"over pools of {', '.join(str(n) for n in pools)}"
    )
    return {"rows": rows, "worst_utilisation": worst, "429s": total_429}


if __name__ == "__main__":
    main(tuple(int(a) for a in sys.argv[1:]) or POOLS)
