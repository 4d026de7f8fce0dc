"""One export end to end through real processes: webhook, workers, sandbox, storage."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import redis
from celery import chain
from e2e_support import StackFactory, start_caller_worker, wait_final

from worker.cli.stack import LocalStack
from worker.deliverable.storage import Storage
from worker.model.jobs import JobStore, State

pytestmark = pytest.mark.integration


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _downloads(stack: LocalStack) -> list[dict]:
    return [e for e in stack.journal() if e["kind"] == "download" and e["status"] == 200]


def test_single_export_is_stored_byte_for_byte_with_its_manifest(
    make_stack: StackFactory, redis_db: redis.Redis
) -> None:
    stack = make_stack()
    job_id = stack.submit(
        "ada.lovelace@example.com", include_merged_profiles=False, reference="TICKET-1"
    )
    (job,) = wait_final(JobStore(redis_db), [job_id])
    assert job.state == State.DONE, job.error

    storage = Storage(stack.env["STORAGE_URL"])
    manifest = json.loads(storage.get_bytes(f"jobs/{job_id}/manifest.json"))
    exported = storage.get_bytes(f"jobs/{job_id}/export.json")
    (served,) = _downloads(stack)
    # The stored file is exactly what APSIS served, and the manifest says so.
    assert _sha256(exported) == served["sha256"] == manifest["source"]["sha256"]
    assert manifest["reference"] == "TICKET-1"
    assert manifest["job_id"] == job_id
    assert [p["role"] for p in manifest["profiles"]] == ["requested"]
    assert manifest["profiles"][0]["export_key"] == "ada.lovelace@example.com"
    profile = storage.get_bytes(manifest["profiles"][0]["object"])
    assert _sha256(profile) == manifest["profiles"][0]["sha256"]
    assert json.loads(profile)["export_key"] == "ada.lovelace@example.com"
    assert [h["state"] for h in manifest["history"]][-1] == "done"
    # No personal data in any object path.
    assert all("ada" not in key for key in storage.list(f"jobs/{job_id}"))


def test_merged_profiles_each_get_their_document(
    make_stack: StackFactory, redis_db: redis.Redis
) -> None:
    stack = make_stack()
    stack.sandbox_put("/_sandbox/faults", {"keys": {"grace@example.com": {"merged_count": 3}}})
    job_id = stack.submit("grace@example.com", include_merged_profiles=True)
    (job,) = wait_final(JobStore(redis_db), [job_id])
    assert job.state == State.DONE, job.error

    storage = Storage(stack.env["STORAGE_URL"])
    manifest = json.loads(storage.get_bytes(f"jobs/{job_id}/manifest.json"))
    source = json.loads(storage.get_bytes(manifest["source"]["object"]))
    keys_in_file = list(source["profiles"])
    assert len(keys_in_file) == 4
    assert [p["export_key"] for p in manifest["profiles"]] == keys_in_file
    assert sorted(manifest["merged_keys_found"]) == sorted(keys_in_file[1:])
    for entry in manifest["profiles"]:
        document = json.loads(storage.get_bytes(entry["object"]))
        assert document["export_key"] == entry["export_key"]
        assert document["sections"] == source["profiles"][entry["export_key"]]["sections"]
        assert entry["role"] == (
            "requested" if entry["export_key"] == "grace@example.com" else "merged"
        )
    assert job.profiles == 4


def test_callers_chained_task_runs_once_with_the_result(
    make_stack: StackFactory, redis_db: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    stack = make_stack()
    caller = start_caller_worker(stack, redis_url, tmp_path / "caller.log")
    try:
        producer = stack.producer
        job_id = "chained0000000000000000000000001"
        workflow = chain(
            producer.signature(
                "apsis.export_profile",
                args=["alan@example.com"],
                kwargs={"job_id": job_id, "reference": "REF-7"},
                queue="apsis",
            ),
            producer.signature(
                "caller.record_result", kwargs={"tag": "after-export"}, queue="caller"
            ),
        )
        workflow.apply_async()
        (job,) = wait_final(JobStore(redis_db), [job_id])
        assert job.state == State.DONE, job.error
        deadline = time.monotonic() + 30
        while redis_db.llen("caller:results") < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # a second run, if there were one, would land by now
        results = [json.loads(r) for r in redis_db.lrange("caller:results", 0, -1)]
        assert len(results) == 1
        assert results[0]["tag"] == "after-export"
        result = results[0]["result"]
        assert result["job_id"] == job_id
        assert result["state"] == "done"
        assert result["reference"] == "REF-7"
        assert result["manifest"].endswith(f"jobs/{job_id}/manifest.json")
    finally:
        caller.terminate()
        caller.wait(timeout=20)


def test_a_hundred_exports_wait_without_holding_a_worker_slot(
    make_stack: StackFactory, redis_db: redis.Redis
) -> None:
    stack = make_stack(
        workers=1,
        concurrency=2,
        env={"APSIS_EXPORT_RATE": "200", "APSIS_DOWNLOAD_RATE": "12000"},
    )
    # APSIS takes its time: the ready callbacks come 8 s after each request.
    stack.sandbox_put("/_sandbox/faults", {"default": {"ready_delay": 8.0}})
    requests_config = {"limits": {"export": [500, 1.0], "download": [500, 1.0]}}
    import requests

    requests.patch(f"{stack.apsis_url}/_sandbox/config", json=requests_config, timeout=5)
    jobs = JobStore(redis_db)
    job_ids = [stack.submit(f"subject-{n}@example.com") for n in range(100)]

    deadline = time.monotonic() + 30
    while True:
        waiting = [jobs.find(j) for j in job_ids]
        if all(j is not None and j.state in (State.REQUESTED, State.VERIFIED) for j in waiting):
            break
        assert time.monotonic() < deadline, "100 exports were not all requested within 30 s"
        time.sleep(0.1)
    # All 100 are waiting for APSIS, and no task of theirs is queued, running, reserved or
    # scheduled: with acks_late, a task a worker has taken (running, reserved, or held for a
    # countdown) stays in the broker's "unacked" hash until it ends; the queue holds the rest.
    time.sleep(1.0)  # let the last request tasks finish and be acknowledged
    assert redis_db.llen("apsis") == 0
    assert redis_db.hlen("unacked") == 0
    assert redis_db.zcard("unacked_index") == 0
    assert jobs.counts().get("requested", 0) + jobs.counts().get("verified", 0) == 100

    done = wait_final(jobs, job_ids, timeout=90)
    assert [j.state for j in done] == [State.DONE] * 100
