"""Helpers the integration tests share (pytest imports this folder's modules by name)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from worker.cli.stack import LocalStack
from worker.model.jobs import FINAL, Job, JobStore

StackFactory = Callable[..., LocalStack]

#: Where Debian's chromium package installs the browser (else it is looked up on PATH).
CHROMIUM = "/usr/bin/chromium"
#: What the tests leave for a person to look at: rendered pages and their screenshots.
OUTPUT = Path(__file__).resolve().parents[2] / "test-output"
#: Seconds one headless Chromium run may take.
CHROMIUM_TIMEOUT = 120


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
