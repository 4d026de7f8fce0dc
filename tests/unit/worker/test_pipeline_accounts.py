"""A job naming an APSIS account that is not configured fails at once, with the reason.

Before, resolving the account raised a ConfigError in the task: the job stayed queued (or
ready) and every re-dispatch by the watchdog failed the same way until the 7-day deadline.
"""

from __future__ import annotations

import json
from typing import Any

from job_support import make_runtime

from worker.deliverable import manifest
from worker.flow import batches, feeder, pipeline
from worker.flow.batch_file import BatchItem
from worker.flow.runtime import Runtime, runtime_on
from worker.model import batch_store
from worker.model.jobs import ExportOptions, State

APAC = {
    "apac": {"base_url": "https://api-apac.apsis.one", "client_id": "c1", "client_secret": "s1"}
}


class RecordingApsis:
    """Stands in for an account's APSIS client: records the export requests it gets."""

    def __init__(self) -> None:
        self.requested: list[str] = []

    def request_export(self, export_key: str, callback_url: str, **_: Any) -> None:
        self.requested.append(export_key)


def _runtime() -> Runtime:
    return make_runtime(
        APSIS_CLIENT_ID="client-id",
        APSIS_CLIENT_SECRET="client-secret",
        APSIS_ACCOUNTS=APAC,
        CALLBACK_BASE_URL="https://hooks.example.test",
    )


def _submit(rt: Runtime, job_id: str, account: str) -> None:
    pipeline.submit(rt, "ada@example.com", options=ExportOptions(), job_id=job_id, account=account)


def _failure_manifest(rt: Runtime, job_id: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(rt.storage.get_bytes(manifest.manifest_object(job_id)))
    return body


def test_an_unknown_account_fails_the_job_when_requesting() -> None:
    rt = _runtime()
    _submit(rt, "job-unknown-account", "emea-typo")

    pipeline.request(rt, "job-unknown-account")  # no ConfigError, no RetryLater

    job = rt.jobs.get("job-unknown-account")
    assert job.state == State.FAILED
    assert job.error is not None
    assert "'emea-typo' is not configured" in job.error and "APSIS_ACCOUNTS" in job.error
    assert _failure_manifest(rt, job.job_id)["state"] == "failed"


def test_an_account_removed_since_the_request_fails_the_job_when_fetching() -> None:
    before = _runtime()
    _submit(before, "job-gone-account", "apac")
    before.jobs.transition("job-gone-account", State.REQUESTED)
    before.jobs.transition(
        "job-gone-account", State.READY, fields={"download_url": "https://x.test/file"}
    )
    # The pool restarted without the account, on the same Redis and storage.
    rt = runtime_on(
        before.settings.model_copy(update={"APSIS_ACCOUNTS": {}}), before.redis, before.storage
    )

    assert pipeline.fetch_and_store(rt, "job-gone-account", lambda *_: None) is None

    job = rt.jobs.get("job-gone-account")
    assert job.state == State.FAILED
    assert job.error is not None and "'apac' is not configured" in job.error
    assert _failure_manifest(rt, job.job_id)["state"] == "failed"


def test_a_configured_account_is_requested_as_before() -> None:
    rt = _runtime()
    apac = RecordingApsis()
    rt._clients["apac"] = apac  # type: ignore[assignment]
    _submit(rt, "job-apac", "apac")

    pipeline.request(rt, "job-apac")

    assert apac.requested == ["ada@example.com"]
    assert rt.jobs.get("job-apac").state == State.REQUESTED


def test_a_batch_whose_account_was_removed_is_cancelled_and_finalized() -> None:
    before = _runtime()
    items = [BatchItem("ada@example.com"), BatchItem("bo@example.com")]
    assert batches.create(before, "apacbatch", items, options=ExportOptions(), account="apac")
    # The pool restarted without the account: the feeder cannot send, now or ever.
    rt = runtime_on(
        before.settings.model_copy(update={"APSIS_ACCOUNTS": {}}), before.redis, before.storage
    )
    later: list[tuple[str, list[Any]]] = []

    feeder.serve(rt, "apac", lambda name, args, _delay: later.append((name, args)))

    assert rt.batches.get("apacbatch").state == "cancelled"
    assert later == [(batch_store.FINALIZE_TASK, ["apacbatch"])]
    assert feeder.serve(rt, "apac", lambda *_: None) is None  # no loop
