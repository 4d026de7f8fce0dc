"""Webhook throughput: valid callbacks per second through the real webhook under gunicorn,
beside two floors served with the same gunicorn settings (bench/bare_app.py): a bare Flask
endpoint that does nothing (the goal's floor), and one that makes only the webhook's one
Redis write (what the webhook's own code costs beyond the write it exists to make).

Run: python -m bench.webhook_throughput [seconds_per_round]. Load comes from other processes
(keep-alive http.client connections); the sides alternate, ROUNDS rounds each. Every
callback is valid: a code-100 callback for a real job in state ``requested`` (no worker
runs, so each one is verified, flood-checked and appended to the inbox). Beside the rates,
the CPU each side's server processes spent per answer (and Redis's, for the one write),
read from /proc: this shared host's neighbours move a rate more than a cost.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from bench.report import (
    WEBHOOK_THREADS,
    WEBHOOK_WORKERS,
    bench_stack,
    emit,
    group_cpu_seconds,
    pid_cpu_seconds,
    redis_of,
    redis_server_pid,
)
from worker.cli.embedded import free_port
from worker.cli.stack import wait_http
from worker.model import callback_token
from worker.model.jobs import ExportOptions, JobStore, State

#: Seconds of load per round and side; the sides alternate ROUNDS times (this host's
#: neighbours move a single 5 s figure by +-15%: more, shorter rounds average that out),
#: after WARMUP seconds of load on each side that are not counted (first connections).
SECONDS = 4.0
ROUNDS = 3
WARMUP = 1.0
#: Jobs the callbacks of each writing side cycle over (each side its own): each job gets far
#: fewer than the flood limit (20 a minute).
JOBS = 4000
#: The sides, in the order they take turns: the webhook and its two floors.
SIDES = ("webhook", "write", "bare")
#: Load generator processes, and keep-alive connections (threads) in each.
LOADERS = 2
CONNECTIONS = 4
BODY = json.dumps({"code": 100, "message": "Callback verified"}).encode()
HEADERS = {"Content-Type": "application/json", "Content-Length": str(len(BODY))}
GOAL = 0.70


def _connection_loop(
    port: int, paths: list[str], stop_at: float, tally: dict[int, int], lock: threading.Lock
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    local: dict[int, int] = {}
    n = 0
    while time.time() < stop_at:
        conn.request("POST", paths[n % len(paths)], body=BODY, headers=HEADERS)
        response = conn.getresponse()
        response.read()
        local[response.status] = local.get(response.status, 0) + 1
        n += 1
    conn.close()
    with lock:
        for status, count in local.items():
            tally[status] = tally.get(status, 0) + count


def _loader(args: tuple[int, list[str], float, float]) -> dict[int, int]:
    """One load process: CONNECTIONS threads, each its own keep-alive connection."""
    port, paths, start_at, stop_at = args
    tally: dict[int, int] = {}
    lock = threading.Lock()
    time.sleep(max(0.0, start_at - time.time()))
    share = len(paths) // CONNECTIONS
    threads = [
        threading.Thread(
            target=_connection_loop,
            args=(port, paths[i * share : (i + 1) * share], stop_at, tally, lock),
        )
        for i in range(CONNECTIONS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally


def load(port: int, paths: list[str], seconds: float) -> tuple[float, dict[int, int]]:
    """Requests per second answered 2xx over ``seconds``, and the count by status."""
    start_at = time.time() + 0.5  # every process connects and starts together
    stop_at = start_at + seconds
    share = len(paths) // LOADERS
    work = [(port, paths[i * share : (i + 1) * share], start_at, stop_at) for i in range(LOADERS)]
    with multiprocessing.get_context("fork").Pool(LOADERS) as pool:
        tallies = pool.map(_loader, work)
    statuses: dict[int, int] = {}
    for tally in tallies:
        for status, count in tally.items():
            statuses[status] = statuses.get(status, 0) + count
    ok = sum(count for status, count in statuses.items() if 200 <= status < 300)
    return ok / seconds, statuses


def make_jobs(stack: Any, jobs: int) -> list[str]:
    """Jobs in state ``requested`` and a valid callback path for each."""
    client = redis_of(stack)
    store = JobStore(client)
    secret = stack.env["CALLBACK_SECRET"]
    paths = []
    try:
        for n in range(jobs):
            job_id = f"bench{n:06d}"
            store.create(
                job_id,
                export_key=f"hook-{n}@example.com",
                account="sandbox",
                options=ExportOptions(),
                deadline_seconds=3600,
            )
            store.transition(job_id, State.REQUESTED, attempt=1, waiting_until=time.time() + 3600)
            token = callback_token.issue(job_id, 1, secret=secret, ttl=3600)
            paths.append(f"/callbacks/{token}")
    finally:
        client.close()
    return paths


def main(seconds: float = SECONDS) -> dict[str, Any]:
    results: dict[str, list[float]] = {side: [] for side in SIDES}
    statuses: dict[str, dict[int, int]] = {side: {} for side in SIDES}
    # CPU seconds of each side's server processes (and of Redis) while it was loaded: what
    # an answer costs, less moved by this host's neighbours than the rate.
    cpu: dict[str, list[float]] = {side: [0.0, 0.0] for side in SIDES}
    floors: dict[str, subprocess.Popen[bytes]] = {}
    with bench_stack(workers=0) as stack:
        paths = make_jobs(stack, 2 * JOBS)
        # The two writing sides each on their own jobs, so neither meets the flood limit.
        side_paths = {"webhook": paths[:JOBS], "write": paths[JOBS:], "bare": paths[:JOBS]}
        ports = {"webhook": int(stack.webhook_url.rsplit(":", 1)[1])}
        try:
            for side, flag in (("write", ["--write"]), ("bare", [])):
                ports[side] = free_port()
                floors[side] = subprocess.Popen(
                    [sys.executable, "-m", "bench.bare_app", str(ports[side]), *flag],
                    env=stack.env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            groups = {"webhook": stack.webhook.pid if stack.webhook else 0}
            groups.update({side: floor.pid for side, floor in floors.items()})
            redis_pid = redis_server_pid(stack)
            for side in floors:
                wait_http(f"http://127.0.0.1:{ports[side]}/healthz")
            for side in SIDES:
                load(ports[side], side_paths[side], WARMUP)
            for _ in range(ROUNDS):
                for side in SIDES:
                    server_before = group_cpu_seconds([groups[side]])
                    redis_before = pid_cpu_seconds(redis_pid) if redis_pid else 0.0
                    rate, seen = load(ports[side], side_paths[side], seconds)
                    cpu[side][0] += group_cpu_seconds([groups[side]]) - server_before
                    if redis_pid:
                        cpu[side][1] += pid_cpu_seconds(redis_pid) - redis_before
                    results[side].append(rate)
                    for status, count in seen.items():
                        statuses[side][status] = statuses[side].get(status, 0) + count
        finally:
            for floor in floors.values():
                os.killpg(floor.pid, signal.SIGTERM)
                floor.wait(timeout=15)

    names = {"webhook": "webhook", "write": "bare + the one write", "bare": "bare"}
    rows: list[dict[str, Any]] = []
    for side in SIDES:
        non2xx = sum(c for s, c in statuses[side].items() if not 200 <= s < 300)
        answered = max(1, sum(statuses[side].values()))
        rows.append(
            {
                "endpoint": names[side],
                **{f"round{i + 1}_per_s": round(r, 1) for i, r in enumerate(results[side])},
                "mean_per_s": round(sum(results[side]) / len(results[side]), 1),
                "non_2xx": non2xx,
                "server_cpu_us": round(1e6 * cpu[side][0] / answered),
                "redis_cpu_us": round(1e6 * cpu[side][1] / answered),
            }
        )
    webhook, write, bare = rows
    ratio = webhook["mean_per_s"] / bare["mean_per_s"]
    beyond_write = webhook["mean_per_s"] / write["mean_per_s"]
    verdict = "met" if ratio >= GOAL else "MISSED"
    summary = (
        f"webhook_throughput: {webhook['mean_per_s']:,.0f} callbacks/s vs bare "
        f"{bare['mean_per_s']:,.0f} req/s = {100 * ratio:.0f}% (goal >= {100 * GOAL:.0f}%: "
        f"{verdict}); vs bare + the one Redis write {write['mean_per_s']:,.0f}/s = "
        f"{100 * beyond_write:.0f}%; gunicorn gthread {WEBHOOK_WORKERS}x{WEBHOOK_THREADS}, "
        f"{LOADERS}x{CONNECTIONS} keep-alive connections; CPU per answer "
        f"{webhook['server_cpu_us']} us (+{webhook['redis_cpu_us']} us in Redis) vs "
        f"{write['server_cpu_us']} us (+{write['redis_cpu_us']} us) vs {bare['server_cpu_us']} us"
    )
    return emit(
        "webhook_throughput",
        rows,
        summary,
        ratio=round(ratio, 3),
        beyond_write=round(beyond_write, 3),
        goal_met=ratio >= GOAL,
    )


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else SECONDS)
