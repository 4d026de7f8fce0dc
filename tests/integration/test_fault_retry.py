"""Issue 15, item 3: ``apsis-export retry`` of a failed batch item, through real processes.

A batch of three: APSIS fails one key's export every time (the sandbox's failure_code), so
that item fails after its attempts while another item is still being prepared (a slow
ready callback). The operator removes the cause and runs ``apsis-export retry <item>`` (the
command in a child process). The batch must end once, when that item really ended: correct
counts, every row of summary.csv done, one completion event, the caller's chain run once.
Then a batch that has ended with a failed item: ``retry`` of it is refused in one line
(exit 2) and the batch is left as it was.

    .venv/bin/pytest tests/integration/test_fault_retry.py -q -s -p no:cacheprovider
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import chain
from e2e_support import StackFactory

from worker.cli.stack import LocalStack
from worker.deliverable.storage import Storage
from worker.model.inbox import EVENTS_STREAM
from worker.model.jobs import JobStore, State

pytestmark = [pytest.mark.integration, pytest.mark.faults]

REPO = Path(__file__).resolve().parents[2]
FAILING = "refused@example.com"
FINE = "fine@example.com"
SLOW = "slow@example.com"
#: Seconds the slow item's ready callback takes: the batch is still running while the
#: failing item spends its attempts and the operator retries it (checked, not assumed).
SLOW_READY = 25.0


def apsis_export(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=stack.env,
        cwd=REPO,
        capture_output=True,
        encoding="utf-8",
        timeout=120,
        check=False,
    )


def _submit(stack: LocalStack, batch_id: str, keys: list[str]) -> None:
    chain(
        stack.producer.signature(
            "apsis.export_batch",
            args=[keys],
            kwargs={"batch_id": batch_id, "include_merged_profiles": False},
            queue="apsis",
        ),
        stack.producer.signature("caller.record_result", kwargs={"tag": batch_id}, queue="caller"),
    ).apply_async()


def _wait(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    pytest.fail(f"{what} not seen within {timeout:.0f} s")


def _batch(client: redis.Redis, batch_id: str) -> dict[str, str]:
    raw: dict[bytes, bytes] = client.hgetall(f"apsis:batch:{batch_id}")  # type: ignore[assignment]
    return {k.decode(): v.decode() for k, v in raw.items()}


def _batch_events(client: redis.Redis, batch_id: str) -> list[dict[str, str]]:
    entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(EVENTS_STREAM)  # type: ignore[assignment]
    events = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]
    return [e for e in events if e.get("type") == "batch" and e.get("batch_id") == batch_id]


def _chain_results(client: redis.Redis, tag: str) -> list[dict[str, Any]]:
    results = [json.loads(r) for r in client.lrange("caller:results", 0, -1)]
    return [r["result"] for r in results if r["tag"] == tag]


def _summary(stack: LocalStack, batch_id: str) -> list[dict[str, str]]:
    text = Storage(stack.env["STORAGE_URL"]).get_bytes(f"batches/{batch_id}/summary.csv")
    return list(csv.DictReader(io.StringIO(text.decode())))


def test_retry_of_a_failed_batch_item_ends_the_batch_once(
    make_stack: StackFactory, redis_db: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    stack = make_stack()
    jobs = JobStore(redis_db)
    caller = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "caller_app", "worker", "-Q", "caller"]
        + ["--concurrency", "1", "--without-gossip", "--without-mingle", "-n", "caller@%h"],
        cwd=Path(__file__).parent,
        env={**stack.env, "REDIS_URL": redis_url},
        stdout=(tmp_path / "caller.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        stack.sandbox_put(
            "/_sandbox/faults",
            {"keys": {FAILING: {"failure_code": 410}, SLOW: {"ready_delay": SLOW_READY}}},
        )
        _submit(stack, "RETRY1", [FAILING, FINE, SLOW])
        item = "RETRY1.0"
        failed = _wait(
            "the failing item's failure",
            lambda: (job := jobs.find(item)) is not None and job.state == State.FAILED and job,
            60,
        )
        before = _batch(redis_db, "RETRY1")
        # The test's premise: the slow item still runs, so the batch has not ended.
        assert before["state"] == "running" and not before.get("finished_at"), before
        assert (before["failed"], before.get("done", "0")) == ("1", "1"), before

        # The operator removes the cause and retries the item.
        stack.sandbox_put("/_sandbox/faults", {"keys": {SLOW: {"ready_delay": SLOW_READY}}})
        retried_at = time.monotonic()
        ran = apsis_export(stack, "retry", item)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.strip() == f"{item} queued again (attempt {failed.attempt + 1})"
        after = _batch(redis_db, "RETRY1")
        assert after["failed"] == "0", after  # the failure was taken back with the restart

        _wait("the batch's end", lambda: _batch(redis_db, "RETRY1").get("finished_at"), 60)
        ended_after = time.monotonic() - retried_at
        batch = _batch(redis_db, "RETRY1")
        assert (batch["state"], batch["done"], batch["failed"]) == ("done", "3", "0"), batch
        rows = _summary(stack, "RETRY1")
        assert [(r["export_key"], r["state"], r["reason"]) for r in rows] == [
            (FAILING, "done", ""),
            (FINE, "done", ""),
            (SLOW, "done", ""),
        ]
        manifest = json.loads(
            Storage(stack.env["STORAGE_URL"]).get_bytes("batches/RETRY1/manifest.json")
        )
        assert manifest["counts"] == {"done": 3, "failed": 0, "cancelled": 0}

        # The retried item ended on the normal path, not swept by the watchdog.
        job = jobs.get(item)
        assert job.state == State.DONE, job.error
        notes = [entry["note"] for entry in jobs.history(item)]
        assert "retry requested" in notes
        assert not [n for n in notes if "EXPORT_DEADLINE" in n or "no ready callback" in n]

        _wait("the caller's chain", lambda: _chain_results(redis_db, "RETRY1"), 30)
        time.sleep(1.0)  # a second chain or event, if there were one, would land by now
        chains = _chain_results(redis_db, "RETRY1")
        events = _batch_events(redis_db, "RETRY1")
        assert [(c["state"], c["done"], c["failed"]) for c in chains] == [("done", 3, 0)]
        assert [(e["state"], e["done"], e["failed"]) for e in events] == [("done", "3", "0")]
        exports = [
            e
            for e in stack.journal()
            if e["kind"] == "export" and e.get("export_key") == FAILING and e["status"] == 202
        ]
        print(
            f"\nretry: item failed after {failed.attempt} attempts, retried; "
            f"batch ended {ended_after:.1f} s after the retry; export requests for the item: "
            f"{len(exports)}; batch events: {len(events)}; chains run: {len(chains)}"
        )

        # A batch that has ended is not reopened: the retry is refused in one line.
        stack.sandbox_put("/_sandbox/faults", {"keys": {"gone@example.com": {"failure_code": 410}}})
        _submit(stack, "RETRY2", ["gone@example.com"])
        _wait("the second batch's end", lambda: _batch(redis_db, "RETRY2").get("finished_at"), 60)
        ran = apsis_export(stack, "retry", "RETRY2.0")
        assert ran.returncode == 2, (ran.stdout, ran.stderr)
        assert ran.stdout == ""
        assert ran.stderr.count("\n") == 1 and "Traceback" not in ran.stderr
        assert "batch RETRY2, which has ended" in ran.stderr
        assert "gone@" not in ran.stderr
        assert jobs.get("RETRY2.0").state == State.FAILED
        batch = _batch(redis_db, "RETRY2")
        assert (batch["state"], batch["failed"]) == ("done", "1")
        _wait("the second batch's chain", lambda: _chain_results(redis_db, "RETRY2"), 30)
        assert len(_batch_events(redis_db, "RETRY2")) == 1
        print(f"refused: {ran.stderr.strip()}")
    finally:
        caller.terminate()
        caller.wait(timeout=20)
