"""Issue 15, item 2: a batch whose finalize fails on a storage outage is still finalized.

A batch of two (a caller's task chained after it) runs through real processes. Before it
ends, the storage root's ``batches/`` folder is made unwritable (a file stands where the
folder goes: the tests run as root, so a chmod would not stop a write). The batch's
finalize fails, is retried once (BATCH_FINALIZE_RETRIES=1), and gives up. Then storage
comes back. The watchdog's sweep must find the complete-but-unfinalized batch (feeders keep
running all along) and have it finalized: summary and manifest stored, the batch done, one
completion event and the caller's chain run exactly once. Nothing else was lost, so no job
may be rescued by the watchdog.

    .venv/bin/pytest tests/integration/test_fault_batches.py -q -s -p no:cacheprovider
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from e2e_support import (
    StackFactory,
    batch_events,
    batch_hash,
    chain_results,
    start_caller_worker,
    submit_chained_batch,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families

from worker.cli.stack import LocalStack
from worker.deliverable.storage import Storage

pytestmark = [pytest.mark.integration, pytest.mark.faults]

BATCH = "OUTAGE1"
KEYS = ["ann@example.com", "bob@example.com"]
ENV = {
    "WATCHDOG_INTERVAL": "0.5",
    "WATCHDOG_STUCK_AFTER": "3",
    "BATCH_FINALIZE_RETRIES": "1",
    "LOG_LEVEL": "INFO",
}
RESCUED = "apsis_export_batches_finalized_by_safety_net_total"


def _log_lines(stack: LocalStack) -> list[dict[str, Any]]:
    lines = []
    for log in sorted(stack.log_dir.glob("worker-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return lines


def _watchdog_counts(lines: list[dict[str, Any]]) -> dict[str, int]:
    """The watchdog's rescues, summed over its 'sweep acted' lines, by kind."""
    counts: dict[str, int] = {}
    for line in lines:
        if line.get("event") != "watchdog":
            continue
        for part in str(line.get("reason", "")).split():
            name, _, value = part.partition("=")
            counts[name] = counts.get(name, 0) + int(value or 0)
    return counts


def _metric(stack: LocalStack, name: str) -> float:
    total = 0.0
    for port in stack.worker_metrics_ports:
        answer = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        answer.raise_for_status()
        for family in text_string_to_metric_families(answer.text):
            total += sum(s.value for s in family.samples if s.name == name)
    return total


def test_a_batch_whose_finalize_failed_on_storage_is_finalized_by_the_safety_net(
    make_stack: StackFactory, redis_db: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "exports"
    stack = make_stack(storage_url=f"file://{root}", env=ENV)
    caller = start_caller_worker(stack, redis_url, tmp_path / "caller.log")
    try:
        # The outage: nothing can be written under batches/ (jobs/ stays writable).
        root.mkdir(parents=True, exist_ok=True)
        blocker = root / "batches"
        blocker.write_bytes(b"not a folder")
        submit_chained_batch(stack, BATCH, KEYS)

        def gave_up() -> bool:
            return any(
                line.get("batch_id") == BATCH and "retries spent" in str(line.get("msg"))
                for line in _log_lines(stack)
            )

        wait_for("the finalize giving up on the storage outage", gave_up, 40)
        before = batch_hash(redis_db, BATCH)
        # The test's premise: every job ended, the batch is not finalized, no chain ran.
        assert int(before["done"]) == len(KEYS), before
        assert before["state"] == "running" and not before.get("finished_at"), before
        assert chain_results(redis_db, BATCH) == []
        failed_attempts = sum(
            1
            for line in _log_lines(stack)
            if line.get("batch_id") == BATCH and "batch finalize failed" in str(line.get("msg"))
        )

        blocker.unlink()  # storage is back
        back_at = time.monotonic()
        wait_for("the batch's end", lambda: batch_hash(redis_db, BATCH).get("finished_at"), 30)
        finished_after = time.monotonic() - back_at
        wait_for("the caller's chain", lambda: chain_results(redis_db, BATCH), 30)
        time.sleep(2.0)  # a second chain or event, if there were one, would land by now

        batch = batch_hash(redis_db, BATCH)
        assert (batch["state"], batch["done"], batch["failed"]) == ("done", "2", "0"), batch
        storage = Storage(stack.env["STORAGE_URL"])
        manifest = json.loads(storage.get_bytes(f"batches/{BATCH}/manifest.json"))
        assert manifest["counts"] == {"done": 2, "failed": 0, "cancelled": 0}
        assert storage.get_bytes(f"batches/{BATCH}/summary.csv").count(b"\n") == 3
        chains = chain_results(redis_db, BATCH)
        assert [(c["state"], c["done"], c["failed"]) for c in chains] == [("done", 2, 0)]
        assert [e["state"] for e in batch_events(redis_db, BATCH)] == ["done"]
        assert redis_db.zscore("apsis:batches:running", BATCH) is None

        lines = _log_lines(stack)
        rescued = sum(
            1
            for line in lines
            if line.get("event") == "batch_rescued" and line.get("batch_id") == BATCH
        )
        watchdog = _watchdog_counts(lines)
        assert rescued == 1
        assert _metric(stack, RESCUED) == 1
        assert watchdog.get("batches_finalized", 0) >= 1
        # Only the batch's finalize was lost: no job was rescued by the watchdog.
        job_rescues = {k: v for k, v in watchdog.items() if k != "batches_finalized" and v}
        assert job_rescues == {}
        for line in lines:
            text = json.dumps(line)
            assert not any(key in text for key in KEYS), line  # no export key in any log
        print(
            f"\nbatches finalized by the safety net: {rescued}; finalize attempts failed "
            f"before it gave up: {failed_attempts}; finalize dispatched by the sweep: "
            f"{watchdog.get('batches_finalized', 0)}; batch finished {finished_after:.1f} s "
            f"after storage came back; chains run: {len(chains)}; batch events: "
            f"{len(batch_events(redis_db, BATCH))}; jobs rescued by the watchdog: 0"
        )
    finally:
        caller.terminate()
        caller.wait(timeout=20)
