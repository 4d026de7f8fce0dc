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
import time
from pathlib import Path

import pytest
import redis
from e2e_support import (
    StackFactory,
    apsis_export,
    batch_events,
    batch_hash,
    chain_results,
    start_caller_worker,
    submit_chained_batch,
    wait_for,
)

from worker.cli.stack import LocalStack
from worker.deliverable.storage import Storage
from worker.model.jobs import JobStore, State

pytestmark = [pytest.mark.integration, pytest.mark.faults]

FAILING = "refused@example.com"
FINE = "fine@example.com"
SLOW = "slow@example.com"
#: Seconds the slow item's ready callback takes: the batch is still running while the
#: failing item spends its attempts and the operator retries it (checked, not assumed).
SLOW_READY = 25.0


def _summary(stack: LocalStack, batch_id: str) -> list[dict[str, str]]:
    text = Storage(stack.env["STORAGE_URL"]).get_bytes(f"batches/{batch_id}/summary.csv")
    return list(csv.DictReader(io.StringIO(text.decode())))


def test_retry_of_a_failed_batch_item_ends_the_batch_once(
    make_stack: StackFactory, redis_db: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    stack = make_stack()
    jobs = JobStore(redis_db)
    caller = start_caller_worker(stack, redis_url, tmp_path / "caller.log")
    try:
        stack.sandbox_put(
            "/_sandbox/faults",
            {"keys": {FAILING: {"failure_code": 410}, SLOW: {"ready_delay": SLOW_READY}}},
        )
        submit_chained_batch(stack, "RETRY1", [FAILING, FINE, SLOW])
        item = "RETRY1.0"
        failed = wait_for(
            "the failing item's failure",
            lambda: (job := jobs.find(item)) is not None and job.state == State.FAILED and job,
            60,
        )
        before = batch_hash(redis_db, "RETRY1")
        # The test's premise: the slow item still runs, so the batch has not ended.
        assert before["state"] == "running" and not before.get("finished_at"), before
        assert (before["failed"], before.get("done", "0")) == ("1", "1"), before

        # The operator removes the cause and retries the item.
        stack.sandbox_put("/_sandbox/faults", {"keys": {SLOW: {"ready_delay": SLOW_READY}}})
        retried_at = time.monotonic()
        ran = apsis_export(stack, "retry", item)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.strip() == f"{item} queued again (attempt {failed.attempt + 1})"
        after = batch_hash(redis_db, "RETRY1")
        assert after["failed"] == "0", after  # the failure was taken back with the restart

        wait_for("the batch's end", lambda: batch_hash(redis_db, "RETRY1").get("finished_at"), 60)
        ended_after = time.monotonic() - retried_at
        batch = batch_hash(redis_db, "RETRY1")
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

        wait_for("the caller's chain", lambda: chain_results(redis_db, "RETRY1"), 30)
        time.sleep(1.0)  # a second chain or event, if there were one, would land by now
        chains = chain_results(redis_db, "RETRY1")
        events = batch_events(redis_db, "RETRY1")
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
        submit_chained_batch(stack, "RETRY2", ["gone@example.com"])
        wait_for(
            "the second batch's end", lambda: batch_hash(redis_db, "RETRY2").get("finished_at"), 60
        )
        ran = apsis_export(stack, "retry", "RETRY2.0")
        assert ran.returncode == 2, (ran.stdout, ran.stderr)
        assert ran.stdout == ""
        assert ran.stderr.count("\n") == 1 and "Traceback" not in ran.stderr
        assert "batch RETRY2, which has ended" in ran.stderr
        assert "gone@" not in ran.stderr
        assert jobs.get("RETRY2.0").state == State.FAILED
        batch = batch_hash(redis_db, "RETRY2")
        assert (batch["state"], batch["failed"]) == ("done", "1")
        wait_for("the second batch's chain", lambda: chain_results(redis_db, "RETRY2"), 30)
        assert len(batch_events(redis_db, "RETRY2")) == 1
        print(f"refused: {ran.stderr.strip()}")
    finally:
        caller.terminate()
        caller.wait(timeout=20)
