"""In flight: 10,000 exports waiting for APSIS at once on a pool of two worker processes.

Run: python -m bench.in_flight [exports]. The sandbox never sends the ready callback
(drop_ready), so every export parks in Redis with no task running. Then, with all of them
waiting, a few new exports are submitted one by one: the time from submit to the sandbox
journal's export request for each shows the pool is still free; and Redis's used_memory
delta gives the bytes per waiting job.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from bench.report import bench_stack, counts, emit, redis_of, used_memory, wait_until

EXPORTS = 10_000
PROBES = 5
#: Seconds between two probes.
PROBE_GAP = 0.5
#: The goal: a new export's request leaves within this many seconds.
GOAL_SECONDS = 1.0


def main(exports: int = EXPORTS) -> dict[str, Any]:
    with bench_stack(workers=1, concurrency=2) as stack:
        client = redis_of(stack)
        journal = stack.sandbox.state.journal
        try:
            stack.submit("warm@example.com")
            wait_until(lambda: counts(client).get("done", 0) >= 1, timeout=60, what="warm-up")
            stack.sandbox_put("/_sandbox/faults", {"default": {"drop_ready": True}})
            time.sleep(0.5)
            before = used_memory(client)

            started = time.monotonic()
            for n in range(exports):
                stack.submit(f"flight-{n}@example.com", include_merged_profiles=False)
            submitted = time.monotonic() - started
            waited = wait_until(
                lambda: (
                    counts(client).get("verified", 0) >= exports
                    and client.llen("apsis") == 0
                    and client.xlen("apsis:inbox") == 0
                ),
                timeout=240,
                what=f"{exports} exports waiting",
                every=0.5,
            )
            all_waiting = submitted + waited
            bytes_per_job = (used_memory(client) - before) / exports
            parked = counts(client)

            journal.clear()
            probes: list[float] = []
            for n in range(PROBES):
                key = f"probe-{n}@example.com"
                sent = time.time()
                stack.submit(key, include_merged_profiles=False)
                entries = journal.wait_for(
                    lambda found, k=key: any(
                        e["kind"] == "export" and e.get("export_key") == k for e in found
                    ),
                    timeout=30,
                )
                at = next(e["ts"] for e in entries if e.get("export_key") == key)
                probes.append(at - sent)
                time.sleep(PROBE_GAP)
        finally:
            client.close()

    worst = max(probes)
    rows = [
        {
            "waiting_jobs": parked.get("verified", 0) + parked.get("requested", 0),
            "worker_processes": 2,
            "seconds_to_all_waiting": round(all_waiting, 1),
            "redis_bytes_per_waiting_job": round(bytes_per_job),
            "probe_ms_median": round(1000 * sorted(probes)[len(probes) // 2], 1),
            "probe_ms_max": round(1000 * worst, 1),
        }
    ]
    ok = worst <= GOAL_SECONDS
    summary = (
        f"in_flight: {exports:,} exports waiting on 2 worker processes; a new export's request "
        f"left in at most {1000 * worst:.0f} ms (goal <= {GOAL_SECONDS * 1000:.0f} ms: "
        f"{'met' if ok else 'MISSED'}); Redis {bytes_per_job:,.0f} B per waiting job"
    )
    return emit(
        "in_flight",
        rows,
        summary,
        probe_max_ms=round(1000 * worst, 1),
        bytes_per_waiting_job=round(bytes_per_job),
        goal_met=ok,
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else EXPORTS)
