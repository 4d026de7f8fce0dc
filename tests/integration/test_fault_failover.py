"""Failover: exports through two SIGKILLs of the Redis primary of a Sentinel group.

A primary and a replica (AOF on) and three sentinels (``redis-server --sentinel``); the
webhook and two workers reach Redis only through the sentinels (REDIS_SENTINELS) and have
every write others rely on confirmed by the replica (REDIS_MIN_REPLICAS_ACK=1). Exports are
sent in waves, as a careful caller sends them (each wave confirmed by a replica with WAIT,
sent again with the same job ids if it was not); APSIS's callbacks arrive throughout. The
primary is SIGKILLed mid-run, then the new primary too; each time the killed server comes
back as a replica of the new one.

Then: no job lost, each done with exactly one download, every stored file's sha256 is what
the sandbox served, the inbox drained. The figures (seconds without a primary, callbacks
answered 503 and re-sent, tasks redelivered, ...) are printed (run with -s) and written to
test-output/failover-figures.txt. 300 exports in `make test`; `make faults`
(APSIS_TEST_SCALE=1) sends 1,000.

    .venv/bin/pytest tests/integration/test_fault_failover.py -q -s -p no:cacheprovider
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from e2e_support import SCALE
from fault_support import stored_problems
from kombu.exceptions import OperationalError
from sentinel_support import SentinelGroup
from test_fault_injection import _log_figures

from worker.cli.stack import LocalStack
from worker.deliverable.storage import Storage
from worker.model import callback_token
from worker.model.inbox import STREAM
from worker.model.jobs import FINAL, ExportOptions, Job, JobStore, State

pytestmark = [pytest.mark.integration, pytest.mark.faults]

REPO = Path(__file__).resolve().parents[2]
FIGURES = REPO / "test-output" / "failover-figures.txt"

EXPORTS = 1000 if SCALE == 1 else 300
WAVES = 20 if SCALE == 1 else 10
#: Seconds between two waves of submissions.
WAVE_EVERY = 2.5
#: When each SIGKILL of the primary starts, in seconds after the first wave (the second
#: waits for the first failover to settle: the killed server back and in sync).
KILLS_AT = (6.0, 15.0)
#: Seconds every job may take to end after the last wave.
FINAL_TIMEOUT = 150.0
#: Seconds a careful caller waits for a replica to confirm its wave.
CALLER_WAIT_MS = 2000

ENV = {
    "APSIS_EXPORT_RATE": "400",
    "APSIS_DOWNLOAD_RATE": "24000",
    "APSIS_TOKEN_RATE": "600",
    "REDIS_MIN_REPLICAS_ACK": "1",
    "REDIS_WAIT_TIMEOUT_MS": "1000",
    "WATCHDOG_INTERVAL": "1",
    "WATCHDOG_STUCK_AFTER": "10",
    "INBOX_RECLAIM_AFTER": "3",
    "CELERY_VISIBILITY_TIMEOUT": "30",
    "DOWNLOAD_TIMEOUT": "20",  # no fetch may outlive the visibility timeout
    "LOG_LEVEL": "INFO",
}
SANDBOX_CONFIG = {
    "limits": {"export": [1000, 1.0], "download": [1000, 1.0], "token": [1000, 60.0]},
    # The "ready" callback trails its request, so callbacks arrive all through the run.
    "ready_delay": 2.0,
    # A callback answered 503 is sent again 0.3 s, 0.6 s, ... later: APSIS retries.
    "callback_retries": 30,
    "callback_backoff": 0.3,
}


class Caller:
    """Sends exports as another service would, through kombu's own Sentinel transport:
    retrying a publish that met no primary, and confirming each wave with WAIT (a wave no
    replica confirmed is sent again, with the same job ids: the task is idempotent)."""

    def __init__(self, stack: LocalStack, group: SentinelGroup) -> None:
        self.stack = stack
        self.client = group.client()
        self.publish_errors = 0
        self.unconfirmed_waves = 0

    def send(self, wave: list[tuple[str, str]]) -> None:
        deadline = time.monotonic() + 90
        while True:
            primary = self._primary()
            for key, job_id in wave:
                self._publish(key, job_id, deadline)
            if self._confirmed(primary):
                return
            self.unconfirmed_waves += 1
            assert time.monotonic() < deadline, "no replica confirmed a wave for 90 s"

    def _publish(self, key: str, job_id: str, deadline: float) -> None:
        while True:
            try:
                self.stack.submit(key, job_id=job_id)
                return
            except (OperationalError, redis.RedisError, OSError):
                self.publish_errors += 1
                assert time.monotonic() < deadline, "no primary took a publish for 90 s"
                time.sleep(0.2)

    def _primary(self) -> str | None:
        """The primary's run id (None: no primary answered)."""
        try:
            return str(self.client.info("server")["run_id"])
        except redis.RedisError:
            time.sleep(0.2)
            return None

    def _confirmed(self, primary: str | None) -> bool:
        """A replica holds everything the primary ran before this write — and the primary
        is still the one that took the wave (WAIT on the new primary after a failover
        confirms nothing the old one took and never passed on)."""
        if primary is None:
            return False
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.set("apsis:caller-confirm", repr(time.time()))
            pipe.wait(1, CALLER_WAIT_MS)
            pipe.info("server")
            _, acked, server = pipe.execute()
            return int(acked) >= 1 and str(server["run_id"]) == primary
        except redis.RedisError:
            time.sleep(0.2)
            return False


@pytest.mark.timeout(900)
def test_no_export_is_lost_through_two_failovers(tmp_path: Path) -> None:
    started = time.monotonic()
    group = SentinelGroup(tmp_path / "redis").start()
    stack = LocalStack(
        redis_url=f"redis://127.0.0.1:{group.primary_port()}/0",
        storage_url=f"file://{tmp_path}/exports",
        workers=2,
        concurrency=2,
        env={**ENV, **group.env()},
        log_dir=tmp_path,
    )
    try:
        stack.start()
        requests.patch(
            f"{stack.apsis_url}/_sandbox/config", json=SANDBOX_CONFIG, timeout=5
        ).raise_for_status()
        caller = Caller(stack, group)
        keys = [f"failover-{n:04d}@example.com" for n in range(EXPORTS)]
        job_of = {key: f"failover{n:04d}" + "0" * 20 for n, key in enumerate(keys)}
        per_wave = -(-EXPORTS // WAVES)

        kills: list[Any] = []

        def kill_primaries(t0: float) -> None:
            for at in KILLS_AT:
                time.sleep(max(0.0, t0 + at - time.monotonic()))
                kills.append(group.fail_over())

        t0 = time.monotonic()
        killer = threading.Thread(target=kill_primaries, args=(t0,), daemon=True)
        killer.start()
        for wave in range(WAVES):
            time.sleep(max(0.0, t0 + wave * WAVE_EVERY - time.monotonic()))
            chunk = keys[wave * per_wave : (wave + 1) * per_wave]
            caller.send([(key, job_of[key]) for key in chunk])
        killer.join(timeout=120)
        assert len(kills) == len(KILLS_AT), "a failover did not complete"

        jobs = JobStore(group.client())
        final = _wait_final(jobs, list(job_of.values()), timeout=FINAL_TIMEOUT)
        ended_after = time.monotonic() - t0
        _wait_inbox_drained(jobs, timeout=30.0)

        journal = stack.journal()
        exports = requests.get(f"{stack.apsis_url}/_sandbox/exports", timeout=60).json()
        served: dict[str, set[str]] = {}
        for export in exports:
            served.setdefault(export["export_key"], set()).add(export["sha256"])
        downloads = Counter(
            e["export_key"] for e in journal if e["kind"] == "download" and e["status"] == 200
        )
        storage = Storage(stack.env["STORAGE_URL"])
        problems: dict[str, list[str]] = {"lost": [], "not_done": [], "bad_object": []}
        duplicated = {key: n for key, n in downloads.items() if n > 1}
        for key, job_id in job_of.items():
            job = final[job_id]
            if job is None or job.state not in FINAL:
                problems["lost"].append(f"{job_id}: {job.state.value if job else 'missing'}")
            elif job.state != State.DONE:
                problems["not_done"].append(f"{job_id}: {job.state.value}: {job.error}")
            else:
                for found in stored_problems(storage, job_id, served.get(key, set())):
                    problems["bad_object"].append(f"{job_id}: {found}")

        figures = _figures(
            stack, group, kills, caller, final, journal, downloads, duplicated, problems
        )
        figures += f"every job ended {ended_after:.1f} s after the first wave\n"
        figures += f"wall time: {time.monotonic() - started:.1f} s\n"
        FIGURES.parent.mkdir(exist_ok=True)
        FIGURES.write_text(figures)
        print("\n" + figures)

        assert not problems["lost"], f"lost jobs: {problems['lost'][:10]}"
        assert not duplicated, f"duplicated downloads: {list(duplicated.items())[:10]}"
        for name, found in problems.items():
            assert not found, f"{name}: {found[:10]}"
        assert sum(downloads.values()) == EXPORTS
        assert _callbacks_answered(journal, 503) > 0, "no callback met a failover (503)"
        exited = [p.pid for p in stack.worker_processes if p.poll() is not None]
        assert not exited, f"worker processes exited: {exited}"
    finally:
        stack.stop()
        group.stop()


@pytest.mark.timeout(120)
def test_the_webhook_answers_2xx_only_once_a_replica_holds_the_callback(tmp_path: Path) -> None:
    group = SentinelGroup(tmp_path / "redis").start()
    stack = LocalStack(
        redis_url=f"redis://127.0.0.1:{group.primary_port()}/0",
        storage_url=f"file://{tmp_path}/exports",
        workers=0,
        env={**ENV, **group.env(), "REDIS_WAIT_TIMEOUT_MS": "300"},
        log_dir=tmp_path,
    )
    try:
        stack.start()
        client = group.client()
        jobs = JobStore(client)
        jobs.create(
            "replicated" + "0" * 22,
            export_key="replica@example.com",
            account="sandbox",
            options=ExportOptions(),
            deadline_seconds=600,
        )
        token = callback_token.issue(
            "replicated" + "0" * 22, 1, secret=stack.env["CALLBACK_SECRET"], ttl=600
        )

        def post() -> requests.Response:
            return requests.post(
                f"{stack.webhook_url}/callbacks/{token}",
                json={"code": 100, "message": "Callback verified"},
                timeout=10,
            )

        replica = group.stop_replica()
        alone = post()
        # Recorded on the primary only: a failover now would lose it, so APSIS must retry.
        assert alone.status_code == 503, alone.text
        assert alone.headers["Retry-After"]
        group.start_replica(replica)
        assert post().status_code == 202
        # What the 202 promised is on the replica, which a failover would promote.
        held = group.admin(replica).xlen(STREAM)
        assert held >= 1
    finally:
        stack.stop()
        group.stop()


def _wait_final(jobs: JobStore, job_ids: list[str], *, timeout: float) -> dict[str, Job | None]:
    deadline = time.monotonic() + timeout
    found: dict[str, Job | None] = {}
    while True:
        with contextlib.suppress(redis.RedisError):
            found = {job_id: jobs.find(job_id) for job_id in job_ids}
            if all(job is not None and job.state in FINAL for job in found.values()):
                return found
        if time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _wait_inbox_drained(jobs: JobStore, *, timeout: float) -> None:
    client: Any = jobs._client
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError):
            if client.xlen(STREAM) == 0:
                return
        time.sleep(0.25)


def _callbacks_answered(journal: list[dict[str, Any]], status: int) -> int:
    return sum(1 for e in journal if e["kind"] == "callback" and e["status"] == status)


_RECEIVED = re.compile(r"Task (apsis\.[a-z_]+)\[([0-9a-f-]+)\] received")


def _redelivered(log_dir: Path) -> Counter[str]:
    """Task messages a worker received more than once (by task name): redeliveries."""
    seen: Counter[tuple[str, str]] = Counter()
    for log in log_dir.glob("worker-*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if match := _RECEIVED.search(line):
                seen[(match.group(1), match.group(2))] += 1
    again: Counter[str] = Counter()
    for (name, _), count in seen.items():
        if count > 1:
            again[name] += count - 1
    return again


def _figures(
    stack: LocalStack,
    group: SentinelGroup,
    kills: list[Any],
    caller: Caller,
    final: dict[str, Job | None],
    journal: list[dict[str, Any]],
    downloads: Counter[str],
    duplicated: dict[str, int],
    problems: dict[str, list[str]],
) -> str:
    states = Counter(job.state.value for job in final.values() if job is not None)
    callbacks = [e for e in journal if e["kind"] == "callback"]
    answered = Counter(e["status"] for e in callbacks)
    redelivered = _redelivered(stack.log_dir)
    lines = [
        "failover figures",
        f"exports: {EXPORTS} ({', '.join(f'{k}: {v}' for k, v in sorted(states.items()))})",
        "topology: primary + replica (AOF), 3 sentinels (down-after 2000 ms, quorum 2),"
        " webhook + 2 workers x concurrency 2, REDIS_MIN_REPLICAS_ACK=1",
    ]
    for n, kill in enumerate(kills, 1):
        lines.append(
            f"kill {n}: primary :{kill.killed_port} SIGKILLed, :{kill.new_port} took writes"
            f" {kill.no_primary_seconds:.2f} s later; replica lag at the kill:"
            f" {kill.lag_bytes} bytes"
        )
    lines += [
        f"callbacks sent by the sandbox: {len(callbacks)}"
        f" (answers: {', '.join(f'{k}: {v}' for k, v in sorted(answered.items()))})",
        f"callbacks answered 503: {answered[503]}; re-sent by the sandbox:"
        f" {sum(1 for e in callbacks if e.get('attempt', 1) > 1)}",
        f"caller: publishes that met no primary (retried): {caller.publish_errors};"
        f" waves no replica confirmed in time (sent again): {caller.unconfirmed_waves}",
        f"tasks redelivered: {sum(redelivered.values())}"
        f" ({', '.join(f'{k}: {v}' for k, v in sorted(redelivered.items())) or 'none'})",
        *(f"{name}: {value}" for name, value in _log_figures(stack.log_dir).items()),
        f"downloads: {sum(downloads.values())} for {len(downloads)} exports",
        f"jobs lost: {len(problems['lost'])}",
        f"duplicated downloads: {sum(n - 1 for n in duplicated.values())}",
        f"stored files not matching what the sandbox served: {len(problems['bad_object'])}",
    ]
    failing = {name: found for name, found in problems.items() if found}
    if failing:
        lines.append("problems:")
        lines += [f"  {name}: {len(found)}: {found[:5]}" for name, found in failing.items()]
    return "\n".join(lines) + "\n"
