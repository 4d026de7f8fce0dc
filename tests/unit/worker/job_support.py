"""Unit helpers: a Runtime on fakeredis + memory storage, and a job run through the real
pipeline with a fake APSIS client serving a given export file."""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any, BinaryIO

import fakeredis

from worker.apsis.client import Downloaded
from worker.config import Settings, load_settings
from worker.deliverable.storage import Storage
from worker.flow import pipeline
from worker.flow.runtime import Runtime, runtime_on
from worker.model.jobs import ExportOptions, State

REQUESTED = "zoe@example.com"


class FakeApsis:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def download(self, url: str, to_file: BinaryIO, *, max_bytes: int, timeout: float) -> Any:
        to_file.write(self.body)
        return Downloaded(sha256=hashlib.sha256(self.body).hexdigest(), bytes=len(self.body))


def runtime_on_fakeredis(settings: Settings, storage: Storage | None = None) -> Runtime:
    """What worker.flow.runtime.build_runtime builds, on an in-process fakeredis (no socket) and
    memory storage unless ``storage`` is given."""
    return runtime_on(settings, fakeredis.FakeRedis(), storage or Storage("memory:///"))


def make_runtime(storage: Storage | None = None, **settings: Any) -> Runtime:
    """``runtime_on_fakeredis`` on test settings (a callback secret, memory storage) plus
    ``settings``."""
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
