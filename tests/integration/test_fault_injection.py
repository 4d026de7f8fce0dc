"""Fault injection: 300 exports through crashes, lost callbacks, APSIS errors and a Redis restart.

One LocalStack with its own redis-server (AOF on), three celery worker processes and the
sandbox misbehaving per export key (see fault_support.KINDS). While the batch runs, worker
process groups are SIGKILLed (and replaced), one worker's main process (the inbox consumer)
is killed with callbacks pending, every issued token is expired and Redis is restarted.

Then: every job ended (done; failed with a reason only where the fault was permanent), no
job is lost or has two results, every stored file matches its manifest and what the sandbox
served, a duplicated/reordered/dropped-verify callback never caused a second download, and
Redis and storage agree. The figures are printed (run with -s) and written to
test-output/fault-figures.txt.

    .venv/bin/pytest tests/integration/test_fault_injection.py -q -s -p no:cacheprovider
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from fault_support import (
    BIG_FILE_BYTES,
    KINDS,
    FaultKind,
    OnceFaults,
    assign_kinds,
    consumer_pending,
    expire_issued_tokens,
    fault_config,
    leased_jobs,
)

from worker.cli.stack import LocalStack, queued_task_ids, retrying, unacked_task_ids
from worker.deliverable.storage import Storage
from worker.model import callback_token
from worker.model.inbox import GROUP, STREAM
from worker.model.jobs import FINAL, Job, JobStore, State

pytestmark = [pytest.mark.integration, pytest.mark.faults]

REPO = Path(__file__).resolve().parents[2]
FIGURES = REPO / "test-output" / "fault-figures.txt"

WORKERS = 3
CONCURRENCY = 2
WAVES = 6
#: Seconds between two waves of submissions (the faults below land between them).
WAVE_EVERY = 3.0
#: Seconds the whole batch may take to end after the last submission.
FINAL_TIMEOUT = 170.0

ENV = {
    "APSIS_EXPORT_RATE": "400",
    "APSIS_DOWNLOAD_RATE": "24000",
    "APSIS_TOKEN_RATE": "600",
    "APSIS_CALLBACK_TIMEOUT": "5",
    "WATCHDOG_INTERVAL": "1",
    "WATCHDOG_STUCK_AFTER": "5",
    "INBOX_RECLAIM_AFTER": "3",
    "CELERY_VISIBILITY_TIMEOUT": "30",
    "DOWNLOAD_TIMEOUT": "20",  # no fetch may outlive the visibility timeout (worker/config.py)
    "LOG_LEVEL": "INFO",
}
SANDBOX_CONFIG = {
    "limits": {"export": [1000, 1.0], "download": [1000, 1.0], "token": [1000, 60.0]},
    # Enough retries (0.5 s, 1 s, 1.5 s, ... apart) to outlast the Redis restart.
    "callback_retries": 12,
    "callback_backoff": 0.5,
}
#: Process faults, in seconds after the first submission.
TIMELINE = [
    (2.5, "kill_worker"),
    (5.0, "kill_inbox_consumer"),
    (7.0, "expire_tokens"),
    (9.5, "restart_redis"),
    (13.0, "kill_worker"),
    (19.0, "kill_worker"),
]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Chaos:
    """Does the process faults of TIMELINE and remembers what they could have disturbed."""

    def __init__(self, stack: LocalStack, client: redis.Redis, big_jobs: set[str]) -> None:
        self.stack = stack
        self.client = client
        self.big_jobs = big_jobs
        self.kills = 0
        self.consumer_kills = 0
        self.redis_restarts = 0
        self.tokens_expired = 0
        #: Jobs with a held lease (fetch/parse/store in progress) around a kill or restart.
        self.disturbed: set[str] = set()
        self.kills_on_big_fetch = 0
        self.consumer_pending_at_kill = 0
        self.dead_consumers: list[str] = []
        self.killed: set[int] = set()
        self.webhook_503 = 0
        self.log: list[str] = []
        self._next = 0

    def live_workers(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.stack.worker_processes if p.poll() is None]

    def _leases(self) -> set[str]:
        leases: set[str] = retrying(lambda: leased_jobs(self.client))
        return leases

    def _victim(self) -> subprocess.Popen[bytes]:
        live = self.live_workers()
        victim = live[self._next % len(live)]
        self._next += 1
        return victim

    def kill_worker(self) -> None:
        # Aim at a moment a big file is being fetched (bounded wait; best effort).
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and not (self._leases() & self.big_jobs):
            time.sleep(0.02)
        before = self._leases()
        victim = self._victim()
        self.killed.add(victim.pid)
        self.stack.kill_worker(victim, signal.SIGKILL)
        self.disturbed |= before | self._leases()
        self.kills_on_big_fetch += bool(before & self.big_jobs)
        self.kills += 1
        self.stack.add_worker()
        self.log.append(f"SIGKILL worker group {victim.pid} (leases held: {len(before)})")

    def kill_inbox_consumer(self) -> None:
        """SIGKILL one worker's main process while its inbox consumer holds unacked entries."""
        victim = self._victim()
        name = f"{socket.gethostname()}-{victim.pid}"
        pending = 0
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            pending = consumer_pending(self.client, STREAM, GROUP).get(name, 0)
            if pending:
                break
            time.sleep(0.002)
        before = self._leases()
        self.killed.add(victim.pid)
        os.kill(victim.pid, signal.SIGKILL)
        self.consumer_pending_at_kill = pending
        self.dead_consumers.append(name)
        # Its pool children lose their parent: end them too, then replace the node.
        self.stack.kill_worker(victim, signal.SIGKILL)
        self.disturbed |= before | self._leases()
        self.consumer_kills += 1
        self.stack.add_worker()
        self.log.append(f"SIGKILL main process {victim.pid} with {pending} callbacks unacked")

    def expire_tokens(self) -> None:
        self.tokens_expired += expire_issued_tokens(self.stack.sandbox.state)
        self.log.append("every issued APSIS token expired")

    def restart_redis(self) -> None:
        self.disturbed |= self._leases()
        restart = threading.Thread(
            target=self.stack.restart_redis, kwargs={"down_for": 1.5}, daemon=True
        )
        restart.start()
        # While it is down, a callback must be refused with 503 (not 2xx): APSIS retries.
        token = callback_token.issue(
            "probe0000000000000000000000000000",
            1,
            secret=self.stack.env["CALLBACK_SECRET"],
            ttl=600,
        )
        statuses: list[int] = []
        deadline = time.monotonic() + 5.0
        while restart.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                answer = requests.post(
                    f"{self.stack.webhook_url}/callbacks/{token}",
                    json={"code": 100, "message": "Callback verified"},
                    timeout=5,
                )
                statuses.append(answer.status_code)
            time.sleep(0.1)
        restart.join(timeout=30)
        assert not restart.is_alive(), "redis-server did not come back"
        self.webhook_503 = statuses.count(503)
        self.redis_restarts += 1
        self.disturbed |= self._leases()
        self.log.append(f"redis restarted; webhook answered {sorted(Counter(statuses).items())}")


@pytest.mark.integration
@pytest.mark.faults
@pytest.mark.timeout(600)
def test_every_export_ends_exactly_once_through_faults(tmp_path: Path) -> None:
    started = time.monotonic()
    kinds = assign_kinds()
    keys = {f"subject-{n:03d}@example.com": kind for n, kind in enumerate(kinds)}
    stack = LocalStack(
        redis_url="",
        redis_appendonly=True,
        storage_url=f"file://{tmp_path}/exports",
        workers=WORKERS,
        concurrency=CONCURRENCY,
        env=ENV,
        log_dir=tmp_path,
    )
    once: OnceFaults | None = None
    try:
        stack.start()
        client = redis.Redis.from_url(stack.redis_url, socket_timeout=5)
        requests.patch(
            f"{stack.apsis_url}/_sandbox/config", json=SANDBOX_CONFIG, timeout=5
        ).raise_for_status()
        stack.sandbox_put("/_sandbox/faults", fault_config(keys))
        once = OnceFaults(
            stack.sandbox.state, {key: kind.once for key, kind in keys.items() if kind.once}
        ).start()

        job_of: dict[str, str] = {}
        chaos = Chaos(stack, client, big_jobs=set())
        events = sorted(
            [(w * WAVE_EVERY, "wave", w) for w in range(WAVES)]
            + [(at, name, None) for at, name in TIMELINE],
            key=lambda e: e[0],
        )
        key_list = list(keys)
        per_wave = -(-len(key_list) // WAVES)
        t0 = time.monotonic()
        for at, name, wave in events:
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            if name == "wave":
                assert wave is not None
                for key in key_list[wave * per_wave : (wave + 1) * per_wave]:
                    job_id = f"fault{len(job_of):04d}" + "0" * 23
                    job_of[key] = job_id
                    if keys[key].name == "big_file":
                        chaos.big_jobs.add(job_id)
                    retrying(lambda k=key, j=job_id: stack.submit(k, job_id=j))
            else:
                getattr(chaos, name)()

        jobs = JobStore(client)
        job_ids = list(job_of.values())
        final = _wait_final(jobs, job_ids, timeout=FINAL_TIMEOUT)
        chaos.log.append(
            f"every job ended {time.monotonic() - t0:.1f} s after the first submission"
        )
        # Late duplicates and stale callbacks still arrive; the inbox must drain to nothing.
        _wait_inbox_drained(client, timeout=30.0)
        once.stop()

        journal = stack.journal()
        exports = {
            d["definition_id"]: d
            for d in requests.get(f"{stack.apsis_url}/_sandbox/exports", timeout=60).json()
        }
        storage = Storage(stack.env["STORAGE_URL"])
        problems = _check(
            keys, job_of, final, journal, exports, storage, client, jobs, chaos.disturbed
        )
        figures = _figures(keys, job_of, final, journal, exports, chaos, started, problems)
        for lost in problems["lost"]:
            figures += _whereabouts(stack, client, lost.split()[0])
        FIGURES.parent.mkdir(exist_ok=True)
        FIGURES.write_text(figures)
        print("\n" + figures)

        assert chaos.kills == 3 and chaos.consumer_kills == 1 and chaos.redis_restarts == 1
        assert chaos.webhook_503 > 0, "the webhook never answered 503 while Redis was down"
        assert not problems["lost"], f"lost jobs: {problems['lost'][:10]}"
        for name, found in problems.items():
            assert not found, f"{name}: {found[:10]}"
        # The dead consumer's unacknowledged callbacks were reclaimed by another node.
        pending = retrying(lambda: consumer_pending(client, STREAM, GROUP))
        assert all(pending.get(name, 0) == 0 for name in chaos.dead_consumers), pending
        exited = {
            p.pid: p.returncode
            for p in stack.worker_processes
            if p.returncode is not None and p.pid not in chaos.killed
        }
        assert not exited, f"worker processes exited on their own (pid: code): {exited}"
    finally:
        if once is not None:
            once.stop()
        stack.stop()


def _wait_final(jobs: JobStore, job_ids: list[str], *, timeout: float) -> dict[str, Job | None]:
    deadline = time.monotonic() + timeout
    while True:
        found = retrying(lambda: {job_id: jobs.find(job_id) for job_id in job_ids})
        if all(job is not None and job.state in FINAL for job in found.values()):
            return found
        if time.monotonic() > deadline:
            return found  # _check reports the stragglers as lost
        time.sleep(0.5)


def _wait_inbox_drained(client: redis.Redis, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if retrying(lambda: client.xlen(STREAM)) == 0:
            return
        time.sleep(0.25)


def _check(
    keys: dict[str, FaultKind],
    job_of: dict[str, str],
    final: dict[str, Job | None],
    journal: list[dict[str, Any]],
    exports: dict[str, dict[str, Any]],
    storage: Storage,
    client: redis.Redis,
    jobs: JobStore,
    disturbed: set[str],
) -> dict[str, list[str]]:
    problems: dict[str, list[str]] = {
        "lost": [],
        "wrong_end": [],
        "no_reason": [],
        "two_results": [],
        "bad_object": [],
        "second_download": [],
        "redis_vs_storage": [],
        "inbox_backlog": [],
    }
    downloads: dict[str, list[dict[str, Any]]] = {}
    for entry in journal:
        if entry["kind"] == "download" and entry["status"] == 200:
            downloads.setdefault(entry["export_key"], []).append(entry)

    for key, kind in keys.items():
        job_id = job_of[key]
        job = final[job_id]
        tag = f"{job_id} ({kind.name})"
        if job is None or job.state not in FINAL:
            problems["lost"].append(f"{tag}: {job.state.value if job else 'missing'}")
            continue
        expected = State.FAILED if kind.permanent else State.DONE
        if job.state != expected:
            problems["wrong_end"].append(f"{tag}: {job.state.value}: {job.error}")
        if job.state == State.FAILED and not (job.error or "").strip():
            problems["no_reason"].append(tag)
        if len([h for h in jobs.history(job_id) if h["state"] in ("done", "failed")]) != 1:
            problems["two_results"].append(f"{tag}: ended more than once")

        try:
            raw_manifest = storage.get_bytes(f"jobs/{job_id}/manifest.json")
        except Exception as exc:  # reported as a problem, whatever it is
            problems["redis_vs_storage"].append(f"{tag}: no manifest ({type(exc).__name__})")
            continue
        manifest = json.loads(raw_manifest)
        if manifest["state"] != job.state.value or manifest["job_id"] != job_id:
            problems["redis_vs_storage"].append(f"{tag}: redis {job.state}, {manifest['state']}")
            continue
        if job.state == State.FAILED:
            if manifest.get("reason") != job.error:
                problems["redis_vs_storage"].append(f"{tag}: failure reasons differ")
            continue

        # Done: Redis names this very manifest and source.
        if job.manifest_sha256 != _sha256(raw_manifest):
            problems["redis_vs_storage"].append(f"{tag}: manifest sha256 differs from Redis")
        if job.source_sha256 != manifest["source"]["sha256"]:
            problems["redis_vs_storage"].append(f"{tag}: source sha256 differs from Redis")
        # One result: the last complete download the sandbox served for this job.
        complete = [
            d
            for d in downloads.get(key, [])
            if d["definition_id"] in exports
            and d.get("sha256") == exports[d["definition_id"]]["sha256"]
            and d.get("bytes") == exports[d["definition_id"]]["bytes"]
        ]
        if not complete:
            problems["two_results"].append(f"{tag}: done without a complete download")
        else:
            served = exports[max(complete, key=lambda d: d["seq"])["definition_id"]]
            if manifest["source"]["sha256"] != served["sha256"]:
                problems["two_results"].append(f"{tag}: stored source is not what was served")
        # Every stored file is what its manifest says.
        stored = {manifest["source"]["object"]: manifest["source"]["sha256"]}
        stored |= {p["object"]: p["sha256"] for p in manifest["profiles"]}
        stored |= {r["object"]: r["sha256"] for r in manifest.get("reports", {}).values()}
        if "package" in manifest:
            stored[manifest["package"]["object"]] = manifest["package"]["sha256"]
        for path, digest in stored.items():
            if _sha256(storage.get_bytes(path)) != digest:
                problems["bad_object"].append(f"{tag}: {path}")
        listed = set(storage.list(f"jobs/{job_id}")) - {f"jobs/{job_id}/manifest.json"}
        if listed != set(stored):
            problems["bad_object"].append(f"{tag}: objects {sorted(listed ^ set(stored))}")
        # Callback faults never cause a second download (unless a kill/restart hit its fetch).
        if kind.strict_one_download and job_id not in disturbed:
            count = len(downloads.get(key, []))
            if count != 1:
                problems["second_download"].append(f"{tag}: {count} downloads")

    backlog = retrying(lambda: client.xlen(STREAM))
    if backlog:
        problems["inbox_backlog"].append(f"{backlog} callbacks never acknowledged")
    return problems


def _whereabouts(stack: LocalStack, client: redis.Redis, job_id: str) -> str:
    """Where a lost job's export_profile message is (queue, unacked, nowhere) and what the
    logs say about its task: what a lost job's report needs to be diagnosed after the run."""
    task_id = stack.task_ids.get(job_id, "?")
    queued = retrying(lambda: queued_task_ids(client))
    unacked = retrying(lambda: unacked_task_ids(client))
    index = dict(retrying(lambda: client.zrange("unacked_index", 0, -1, withscores=True)))
    lines = [f"{job_id}: task {task_id}: queued {queued.count(task_id)}"]
    for tag, found in unacked.items():
        if found == task_id:
            lines.append(f"  unacked as {tag} since {index.get(tag.encode())}")
    for log in sorted(stack.log_dir.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if task_id in line or job_id in line:
                lines.append(f"  {log.name}: {line[:400]}")
    return "\n".join(lines) + "\n"


def _log_figures(log_dir: Path) -> dict[str, int]:
    """What the workers' JSON logs say the safety nets did (counted, never hidden)."""
    events: Counter[str] = Counter()
    sweeps = 0
    for log in log_dir.glob("worker-*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            events[str(record.get("event"))] += 1
            sweeps += record.get("event") == "watchdog"
    return {
        "watchdog rescues (sweeps that acted)": sweeps,
        "batches finalized by the safety net": events["batch_rescued"],
        "duplicate task runs prevented (held replies dropped)": events["message_already_requeued"],
        "requests a dead feeder took, put back in line": events["line_recovered"],
    }


def _figures(
    keys: dict[str, FaultKind],
    job_of: dict[str, str],
    final: dict[str, Job | None],
    journal: list[dict[str, Any]],
    exports: dict[str, dict[str, Any]],
    chaos: Chaos,
    started: float,
    problems: dict[str, list[str]],
) -> str:
    ended = [job for job in final.values() if job is not None]
    states = Counter(job.state.value for job in ended)
    configured = Counter(kind.name for kind in keys.values())

    def count(kind: str, pred: Any) -> int:
        return sum(1 for e in journal if e["kind"] == kind and pred(e))

    def complete(e: dict[str, Any]) -> dict[str, Any] | None:
        return exports.get(e.get("definition_id") or "")

    truncated = count(
        "download",
        lambda e: (
            e["status"] == 200 and (d := complete(e)) is not None and e.get("bytes", 0) < d["bytes"]
        ),
    )
    corrupt = count(
        "download",
        lambda e: (
            e["status"] == 200
            and (d := complete(e)) is not None
            and e.get("bytes") == d["bytes"]
            and e.get("sha256") != d["sha256"]
        ),
    )
    observed = {
        "export 429": count("export", lambda e: e["status"] == 429),
        "export 5xx": count("export", lambda e: (e["status"] or 0) >= 500),
        "download 429": count("download", lambda e: e["status"] == 429),
        "download 5xx": count("download", lambda e: (e["status"] or 0) >= 500),
        "401/403 on an expired token": count("export", lambda e: e["status"] in (401, 403))
        + count("download", lambda e: e["status"] in (401, 403)),
        "truncated downloads (incl. cut by a kill)": truncated,
        "corrupt downloads": corrupt,
        "failure-code callbacks sent": count(
            "callback", lambda e: e.get("code") not in (100, 200) and e.get("attempt") == 1
        ),
        "callbacks answered 503 (Redis down)": count("callback", lambda e: e["status"] == 503),
        "callbacks re-sent by the sandbox": count("callback", lambda e: e.get("attempt", 1) > 1),
    }
    lost = len(problems["lost"])
    duplicated = len(problems["two_results"]) + len(problems["second_download"])
    lines = [
        "fault-injection figures",
        f"jobs: {len(job_of)} ({', '.join(f'{k}: {v}' for k, v in sorted(states.items()))})",
        f"workers: {WORKERS} x concurrency {CONCURRENCY}; big files: {BIG_FILE_BYTES} bytes",
        "faults configured (keys per kind):",
        *(f"  {kind.name}: {configured[kind.name]}" for kind in KINDS),
        "faults observed (sandbox journal):",
        *(f"  {name}: {value}" for name, value in observed.items()),
        f"retries (sum of job.retries): {sum(job.retries for job in ended)}",
        f"re-requests (sum of attempts - 1): {sum(job.attempt - 1 for job in ended)}",
        f"kills (worker process groups, SIGKILL): {chaos.kills}"
        f" ({chaos.kills_on_big_fetch} while a big file was being fetched)",
        f"inbox consumers killed: {chaos.consumer_kills}"
        f" (holding {chaos.consumer_pending_at_kill} unacked callbacks)",
        f"tokens expired: {chaos.tokens_expired}",
        f"redis restarts: {chaos.redis_restarts}"
        f" (webhook probes answered 503: {chaos.webhook_503})",
        f"jobs whose fetch a kill or restart interrupted: {len(chaos.disturbed)}",
        *(f"{name}: {value}" for name, value in _log_figures(chaos.stack.log_dir).items()),
        f"lost: {lost}",
        f"duplicated: {duplicated}",
        f"wall time: {time.monotonic() - started:.1f} s",
        "events:",
        *(f"  {line}" for line in chaos.log),
    ]
    failing = {name: found for name, found in problems.items() if found}
    if failing:
        lines.append("problems:")
        lines += [f"  {name}: {len(found)}: {found[:5]}" for name, found in failing.items()]
    return "\n".join(lines) + "\n"
