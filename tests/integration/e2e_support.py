"""Helpers the integration tests share (pytest imports this folder's modules by name)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from celery import chain

from worker.cli.stack import LocalStack
from worker.model.inbox import EVENTS_STREAM
from worker.model.jobs import FINAL, Job, JobStore

StackFactory = Callable[..., LocalStack]

#: The repository's root (the ``apsis-export`` command runs from there).
REPO = Path(__file__).resolve().parents[2]
#: Where Debian's chromium package installs the browser (else it is looked up on PATH).
CHROMIUM = "/usr/bin/chromium"
#: What the tests leave for a person to look at: rendered pages and their screenshots.
OUTPUT = REPO / "test-output"
#: Seconds one headless Chromium run may take.
CHROMIUM_TIMEOUT = 120


#: The limits' scale: 10 in `make test` (short runs, same shape); `make faults` sets
#: APSIS_TEST_SCALE=1 to run the tests at APSIS's documented rates.
SCALE = int(os.environ.get("APSIS_TEST_SCALE", "10"))


def stack_at_limits(
    make_stack: StackFactory,
    *,
    scale: int,
    workers: int = 2,
    exports_per_second: int = 1,
    sandbox_process: bool = True,
    env: dict[str, str] | None = None,
) -> LocalStack:
    """A stack whose pool paces at, and whose sandbox enforces, APSIS's documented limits
    (1 export/s, 60 downloads/min, 10 tokens/min) x ``scale``; ``exports_per_second``
    replaces the documented 1 export/s. ``sandbox_process=False`` runs the sandbox in this
    process (``stack.sandbox.state``: for faults the control API cannot make); ``env`` adds
    to or overrides the workers' settings (WATCHDOG_INTERVAL is 2 s unless given)."""
    export, download, token = exports_per_second * scale, 60 * scale, 10 * scale
    stack = make_stack(
        workers=workers,
        concurrency=2,
        sandbox_process=sandbox_process,
        env={
            "APSIS_EXPORT_RATE": str(export),
            "APSIS_DOWNLOAD_RATE": str(download),
            "APSIS_TOKEN_RATE": str(token),
            "WATCHDOG_INTERVAL": "2",
            **(env or {}),
        },
    )
    limits = {"export": [export, 1.0], "download": [download, 60.0], "token": [token, 60.0]}
    requests.patch(
        f"{stack.apsis_url}/_sandbox/config", json={"limits": limits}, timeout=5
    ).raise_for_status()
    return stack


def watchdog_rescues(log_dir: Path) -> list[dict[str, Any]]:
    """Every sweep that acted (re-requested, re-dispatched, failed or resumed anything)."""
    return log_events(log_dir, "watchdog")


def rescue_counts(log_dir: Path) -> Counter[str]:
    """What the sweeps that acted did, summed over them: their reason's ``name=N`` fields
    (rerequested, failed, redispatched, chains, batches_finalized, requeued_messages)."""
    counts: Counter[str] = Counter()
    for sweep in watchdog_rescues(log_dir):
        for name, value in re.findall(r"(\w+)=(\d+)", str(sweep.get("reason", ""))):
            counts[name] += int(value)
    return counts


def wait_final(jobs: JobStore, job_ids: list[str], *, timeout: float = 60.0) -> list[Job]:
    """Poll until every job has ended; fail the test with the stragglers' states if not."""
    deadline = time.monotonic() + timeout
    while True:
        found = [jobs.find(job_id) for job_id in job_ids]
        if all(job is not None and job.state in FINAL for job in found):
            return [job for job in found if job is not None]
        if time.monotonic() > deadline:
            states = [job.state.value if job else "missing" for job in found]
            pytest.fail(f"jobs not final after {timeout} s: {sorted(set(states))}")
        time.sleep(0.1)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Poll ``check`` until it returns something true, and return that; fail the test if
    it has not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    pytest.fail(f"{what} not seen within {timeout:.0f} s")


def start_caller_worker(
    stack: LocalStack, redis_url: str, log_path: Path
) -> subprocess.Popen[bytes]:
    """The caller's own Celery worker (caller_app, queue ``caller``), its output in
    ``log_path``; the test stops it (terminate, then wait)."""
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "caller_app", "worker", "-Q", "caller"]
        + ["--concurrency", "1", "--without-gossip", "--without-mingle", "-n", "caller@%h"],
        cwd=Path(__file__).parent,
        env={**stack.env, "REDIS_URL": redis_url},
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )


def apsis_export(
    stack: LocalStack, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The ``apsis-export`` command in a child process, on the stack's environment."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=stack.env,
        cwd=REPO,
        capture_output=True,
        encoding="utf-8",
        timeout=timeout,
        check=False,
    )


def batch_hash(client: redis.Redis, batch_id: str) -> dict[str, str]:
    """The batch's record in Redis, decoded (empty if there is none)."""
    raw: dict[bytes, bytes] = client.hgetall(f"apsis:batch:{batch_id}")  # type: ignore[assignment]
    return {k.decode(): v.decode() for k, v in raw.items()}


def batch_events(client: redis.Redis, batch_id: str) -> list[dict[str, str]]:
    """The batch's completion events on the events stream."""
    entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(EVENTS_STREAM)  # type: ignore[assignment]
    events = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]
    return [e for e in events if e.get("type") == "batch" and e.get("batch_id") == batch_id]


def submit_chained_batch(stack: LocalStack, batch_id: str, keys: list[str]) -> None:
    """A batch of ``keys`` (no merged profiles) with the caller's task chained after it
    (caller.record_result, tagged ``batch_id``)."""
    chain(
        stack.producer.signature(
            "apsis.export_batch",
            args=[keys],
            kwargs={"batch_id": batch_id, "include_merged_profiles": False},
            queue="apsis",
        ),
        stack.producer.signature("caller.record_result", kwargs={"tag": batch_id}, queue="caller"),
    ).apply_async()


def chain_results(client: redis.Redis, tag: str) -> list[dict[str, Any]]:
    """The results the caller's chained task (caller.record_result) got under ``tag``."""
    results = [json.loads(r) for r in client.lrange("caller:results", 0, -1)]
    return [r["result"] for r in results if r["tag"] == tag]


def log_events(log_dir: Path, event: str) -> list[dict[str, Any]]:
    """The workers' JSON log lines of one ``event``."""
    found = []
    for path in log_dir.glob("worker-*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{") and f'"{event}"' in line:
                record = json.loads(line)
                if record.get("event") == event:
                    found.append(record)
    return found


def find_chromium() -> str:
    """The headless browser: skip the test without one, fail it on CI (which installs it)."""
    path = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    if path:
        return path
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("chromium is not installed; .ci/run installs it (apt-get install chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium); CI runs this test")


def run_chromium(chromium: str, profile_dir: Path, *args: str) -> str:
    """Run headless Chromium on a profile of its own, offline; its stdout (e.g. --dump-dom)."""
    done = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile_dir}",
            *args,
        ],
        capture_output=True,
        encoding="utf-8",
        timeout=CHROMIUM_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def screenshot(chromium: str, page: Path, png: Path, *, window: str, profile_dir: Path) -> None:
    """Render ``page`` into ``png`` (replacing any older one) at ``window`` ("W,H") pixels."""
    png.unlink(missing_ok=True)
    run_chromium(
        chromium, profile_dir, f"--screenshot={png}", f"--window-size={window}", page.as_uri()
    )
