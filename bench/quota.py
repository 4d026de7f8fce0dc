"""Quota utilisation: achieved export requests/s over the allowed rate, and 429s, by pool size.

Run: python -m bench.quota. The sandbox enforces a scaled-down export limit (20 requests
per second, "at most N in any trailing second", as APSIS counts); the pool is told the
same rate (APSIS_EXPORT_RATE) and runs one batch per pool size. Then the mixed run: a batch
plus a steady trickle of single exports (one every TRICKLE_EVERY seconds) on the same
account, reporting the singles' wait from send_task to APSIS's 202 (p50, p99).
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
#: Seconds between two singles of the mixed run's trickle.
TRICKLE_EVERY = 0.25


def run_pool(processes: int, *, batch: int = BATCH, trickle: bool = False) -> dict[str, Any]:
    """One batch through a pool of ``processes`` single-slot worker nodes (with ``trickle``,
    singles sent one every TRICKLE_EVERY seconds while the batch runs)."""
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
        sent: dict[str, float] = {}
        next_single = time.monotonic() + 1.0
        while not client.hget(f"apsis:batch:quota{processes}", "finished_at"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"pool of {processes}: batch not finished in time")
            if trickle and time.monotonic() >= next_single:
                key = f"single-{processes}-{len(sent)}@example.com"
                sent[key] = time.time()
                stack.producer.send_task("apsis.export_profile", args=[key], queue="apsis")
                next_single += TRICKLE_EVERY
            time.sleep(0.05 if trickle else 0.25)
        time.sleep(2.0 if trickle else 0.0)  # the last singles' requests
        journal = stack.journal()
        client.close()
    exports = [e for e in journal if e["kind"] == "export" and e["status"] == 202]
    accepted = sorted(e["ts"] for e in exports)
    refused = sum(1 for e in journal if e["status"] == 429)
    achieved = (len(accepted) - 1) / (accepted[-1] - accepted[0])
    row: dict[str, Any] = {
        "processes": processes,
        "exports": len(accepted),
        "achieved": round(achieved, 2),
        "allowed": ALLOWED,
        "utilisation": round(achieved / ALLOWED, 3),
        "429s": refused,
    }
    if trickle:
        waits = sorted(e["ts"] - sent[e["export_key"]] for e in exports if e["export_key"] in sent)
        row["singles"] = len(waits)
        row["single_wait_p50_s"] = round(waits[len(waits) // 2], 3) if waits else None
        row["single_wait_p99_s"] = (
            round(waits[min(len(waits) - 1, int(len(waits) * 0.99))], 3) if waits else None
        )
    return row


def main(pools: tuple[int, ...] = POOLS) -> dict[str, Any]:
    rows = [run_pool(n) for n in pools]
    mixed = [run_pool(n, trickle=True) for n in pools]
    print(
        f"{'processes':>9}  {'exports':>7}  {'achieved/s':>10}  {'allowed/s':>9}  "
        f"{'utilisation':>11}  {'429s':>4}"
    )
    for r in rows:
        print(
            f"{r['processes']:>9}  {r['exports']:>7}  {r['achieved']:>10.2f}  "
            f"{r['allowed']:>9}  {100 * r['utilisation']:>10.1f}%  {r['429s']:>4}"
        )
    print(f"\nmixed: a batch of {BATCH} plus a single every {TRICKLE_EVERY:g} s")
    print(
        f"{'processes':>9}  {'exports':>7}  {'utilisation':>11}  {'429s':>4}  {'singles':>7}  "
        f"{'wait p50 s':>10}  {'wait p99 s':>10}"
    )
    for r in mixed:
        print(
            f"{r['processes']:>9}  {r['exports']:>7}  {100 * r['utilisation']:>10.1f}%  "
            f"{r['429s']:>4}  {r['singles']:>7}  {r['single_wait_p50_s']:>10}  "
            f"{r['single_wait_p99_s']:>10}"
        )
    worst = min(r["utilisation"] for r in rows + mixed)
    total_429 = sum(r["429s"] for r in rows + mixed)
    p99 = max(r["single_wait_p99_s"] or 0.0 for r in mixed)
    summary = (
        f"quota: worst utilisation {100 * worst:.1f}% of the allowed rate, {total_429} 429s "
        f"over pools of {', '.join(str(n) for n in pools)}, batches alone and with singles; "
        f"singles waited at most {p99:.2f} s (p99) for their slot"
    )
    print(summary)
    return {"rows": rows + mixed, "worst_utilisation": worst, "429s": total_429, "summary": summary}


if __name__ == "__main__":
    main(tuple(int(a) for a in sys.argv[1:]) or POOLS)
