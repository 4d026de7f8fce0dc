"""Unit helpers: a Runtime on fakeredis + memory storage, and a job run through the real
pipeline with a fake APSIS client serving a given export file."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

import fakeredis
import pytest

from worker.apsis.client import Downloaded, Limits
from worker.apsis.ratelimit import Limit
from worker.cli import commands as cli
from worker.config import Settings, load_settings
from worker.deliverable.storage import Storage
from worker.errors import RetryableApsisError
from worker.flow import pipeline
from worker.flow.runtime import Runtime, runtime_on
from worker.model.jobs import ExportOptions, State

REQUESTED = "zoe@example.com"
ROOT = Path(__file__).resolve().parents[3]
#: Loopback port 1: refused at once, so nothing waits for a Redis that is not there.
UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"


class FakeApsis:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def download(
        self, url: str, to_file: BinaryIO, *, max_bytes: int, timeout: float, send_at: Any = None
    ) -> Any:
        to_file.write(self.body)
        return Downloaded(sha256=hashlib.sha256(self.body).hexdigest(), bytes=len(self.body))


class _Tokens:
    def get(self) -> str:
        return "token"


class FeedApsis:
    """What the feeder uses of an APSIS client: its limits, its token and export requests;
    records the keys in the order they left. Each key in ``busy_once`` is answered with a
    429 the first time it is requested."""

    def __init__(self, *, busy_once: set[str] | None = None) -> None:
        self.limits = Limits(
            export=Limit(1000, 1.0), download=Limit(1000, 60.0), token=Limit(1000, 60.0)
        )
        self.tokens = _Tokens()
        self._sent: list[tuple[float, str]] = []
        self._busy_once = set(busy_once or ())

    @property
    def requested(self) -> list[str]:
        """The keys in the order of the slots they were sent at (the feeder's sender threads
        may run a moment out of that order on a loaded host; APSIS sees the slots' order)."""
        return [key for _, key in sorted(self._sent)]

    def request_export(
        self, export_key: str, callback_url: str, *, send_at: float | None = None, **_: Any
    ) -> None:
        if export_key in self._busy_once:
            self._busy_once.discard(export_key)
            raise RetryableApsisError("APSIS answered 429", status=429, retry_after=0.2)
        self._sent.append((time.monotonic() if send_at is None else send_at, export_key))


def clear_settings_env(
    monkeypatch: pytest.MonkeyPatch, *, redis_url: str = UNREACHABLE_REDIS
) -> None:
    """A known environment for a test: no variable the settings read, but memory storage and
    ``redis_url``."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STORAGE_URL", "memory:///")
    monkeypatch.setenv("REDIS_URL", redis_url)


def import_celery_app(**env: str) -> subprocess.CompletedProcess[str]:
    """Import worker.queue.app in a child process (what ``celery -A worker worker`` does
    first), in this environment without the settings' variables, plus memory storage, an
    unreachable Redis and ``env``."""
    child_env = {k: v for k, v in os.environ.items() if k not in Settings.model_fields}
    child_env |= {"STORAGE_URL": "memory:///", "REDIS_URL": UNREACHABLE_REDIS, **env}
    return subprocess.run(
        [sys.executable, "-c", "import worker.queue.app"],
        env=child_env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def patch_cli_runtime(monkeypatch: pytest.MonkeyPatch, **settings: Any) -> Runtime:
    """The CLI's runtime on an in-process fake Redis (no socket), on the environment's
    settings plus ``settings``."""
    runtime = runtime_on_fakeredis(load_settings(**settings))
    monkeypatch.setattr(cli, "build_runtime", lambda settings=None: runtime)
    return runtime


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``apsis-export *argv`` in this process: its exit code, stdout and stderr."""
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def runtime_on_fakeredis(settings: Settings, storage: Storage | None = None) -> Runtime:
    """What worker.flow.runtime.build_runtime builds, on an in-process fakeredis (no socket) and
    memory storage unless ``storage`` is given."""
    return runtime_on(settings, fakeredis.FakeRedis(), storage or Storage("memory:///"))


def make_runtime(storage: Storage | None = None, **settings: Any) -> Runtime:
    """``runtime_on_fakeredis`` on test settings (a callback secret, memory storage) plus
    ``settings``."""
    settings.setdefault("APSIS_CLIENT_ID", "test-client")
    settings.setdefault("APSIS_CLIENT_SECRET", secrets.token_urlsafe(32))
    return runtime_on_fakeredis(
        load_settings(
            CALLBACK_SECRET=secrets.token_urlsafe(32), STORAGE_URL="memory:///", **settings
        ),
        storage,
    )


def export_body(requested: str = REQUESTED, merged: list[str] | None = None) -> bytes:
    def profile(email: str) -> dict[str, Any]:
        return {
            "sections": {
                "s1": {
                    "attributes": {
                        "com.apsis1.attributes.email": {
                            "value": email,
                            "history": [{"value": "old@example.com", "changed_at": "2020"}],
                        }
                    },
                    "events": [{"discriminator": "e", "event_time": "2021", "data": {"a": 1}}],
                }
            }
        }

    profiles = {requested: profile(requested)}
    for key in merged or []:
        profiles[key] = profile(key)
    return json.dumps({"profiles": profiles}).encode()


def run_job(
    rt: Runtime,
    job_id: str,
    *,
    body: bytes | None = None,
    export_key: str = REQUESTED,
    batch_id: str | None = None,
    options: ExportOptions | None = None,
    now: float | None = None,
) -> None:
    """Create a job, make it ready and run fetch_and_store with ``body`` as the file."""
    if not rt.jobs.exists(job_id):
        rt.jobs.create(
            job_id,
            export_key=export_key,
            account=rt.settings.APSIS_ACCOUNT,
            options=options or ExportOptions(),
            deadline_seconds=3600,
            batch_id=batch_id,
            now=now,
        )
    rt.jobs.transition(job_id, State.REQUESTED, now=now)
    rt.jobs.transition(job_id, State.READY, fields={"download_url": "https://x/y"}, now=now)
    rt._clients[rt.settings.APSIS_ACCOUNT] = FakeApsis(body or export_body(export_key))  # type: ignore[assignment]
    sent: list[Any] = []
    pipeline.fetch_and_store(rt, job_id, lambda name, args: sent.append((name, args)))
    assert rt.jobs.get(job_id).state == State.DONE, rt.jobs.get(job_id).error
