"""Batches through real processes: paced at the quota, never above it, cancellable, summarised."""

from __future__ import annotations

import csv
import io
import json
import time

import pytest
import redis
import requests
from e2e_support import StackFactory

from worker.cli.stack import LocalStack
from worker.deliverable.storage import Storage

pytestmark = pytest.mark.integration

#: The scaled-down quota the sandbox enforces in these tests (export requests per second).
EXPORT_RATE = 20
#: 429s tolerated in the batch of 1,000 (see the test): 0.5%. Today's runs had 0 to 2; a
#: pool that ignored the limit, or paced at it without a margin, meets far more.
MAX_REFUSED = 5


def _scaled_stack(make_stack: StackFactory, *, workers: int) -> LocalStack:
    # APSIS stamps requests on its own clock: a sandbox inside this process would see them
    # through our own pauses (garbage collection after the unit tests bunched a few: 429s).
    stack = make_stack(
        workers=workers,
        concurrency=1,
        sandbox_process=True,
        env={
            "APSIS_EXPORT_RATE": str(EXPORT_RATE),
            "APSIS_DOWNLOAD_RATE": "6000",
            "WATCHDOG_INTERVAL": "2",
        },
    )
    config = {"limits": {"export": [EXPORT_RATE, 1.0], "download": [100, 1.0]}}
    requests.patch(f"{stack.apsis_url}/_sandbox/config", json=config, timeout=5).raise_for_status()
    return stack


def _submit_batch(stack: LocalStack, keys: list[str], batch_id: str, **kwargs: object) -> None:
    stack.producer.send_task(
        "apsis.export_batch",
        args=[[{"export_key": k, "reference": f"REF-{n}"} for n, k in enumerate(keys)]],
        kwargs={"batch_id": batch_id, "include_merged_profiles": False, **kwargs},
        queue="apsis",
    )


def _wait_batch(client: redis.Redis, batch_id: str, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw: dict[bytes, bytes] = client.hgetall(f"apsis:batch:{batch_id}")  # type: ignore[assignment]
        data = {k.decode(): v.decode() for k, v in raw.items()}
        if data.get("finished_at"):
            return data
        time.sleep(0.25)
    pytest.fail(f"batch {batch_id} not finished after {timeout} s: {data}")


def test_a_batch_of_1000_runs_at_the_quota(make_stack: StackFactory, redis_db: redis.Redis) -> None:
    stack = _scaled_stack(make_stack, workers=4)
    keys = [f"subject-{n:04d}@example.com" for n in range(1000)]
    _submit_batch(stack, keys, "quota1000")
    batch = _wait_batch(redis_db, "quota1000", timeout=180)
    assert batch["state"] == "done"
    assert (batch["done"], batch["failed"]) == ("1000", "0")

    journal = stack.journal()
    exports = [e for e in journal if e["kind"] == "export"]
    refused = [(e["kind"], e["path"]) for e in journal if e["status"] == 429]
    # Paced 4.5% under the limit, requests leave >= 52 ms apart; on this shared 2-core host
    # their arrival at the sandbox still jitters past that room now and then (1 or 2 429s in
    # 2 of 6 full-suite runs). A refused request is retried and done (asserted above).
    assert len(refused) <= MAX_REFUSED, refused
    accepted = sorted(e["ts"] for e in exports if e["status"] == 202)
    assert len(accepted) == 1000
    achieved = (len(accepted) - 1) / (accepted[-1] - accepted[0])
    print(
        f"\nbatch of 1000: {achieved:.2f} requests/s of {EXPORT_RATE} allowed "
        f"({100 * achieved / EXPORT_RATE:.1f}%), 429s: {len(refused)}"
    )
    assert achieved >= 0.95 * EXPORT_RATE
    assert achieved <= EXPORT_RATE

    storage = Storage(stack.env["STORAGE_URL"])
    rows = list(
        csv.DictReader(io.StringIO(storage.get_bytes("batches/quota1000/summary.csv").decode()))
    )
    assert sorted(r["export_key"] for r in rows) == keys
    assert {r["state"] for r in rows} == {"done"}
    assert all(r["manifest"].endswith("manifest.json") for r in rows)
    manifest = json.loads(storage.get_bytes("batches/quota1000/manifest.json"))
    assert manifest["counts"] == {"done": 1000, "failed": 0, "cancelled": 0}


def test_cancel_stops_new_requests_within_a_second(
    make_stack: StackFactory, redis_db: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = _scaled_stack(make_stack, workers=1)
    keys = [f"cancel-{n:03d}@example.com" for n in range(300)]
    _submit_batch(stack, keys, "cancelme")
    deadline = time.monotonic() + 30
    while int(redis_db.hget("apsis:batch:cancelme", "submitted") or 0) < 40:
        assert time.monotonic() < deadline, "the batch did not start"
        time.sleep(0.05)

    from worker.cli.commands import main

    for name in ("REDIS_URL", "STORAGE_URL", "CALLBACK_SECRET"):
        monkeypatch.setenv(name, stack.env[name])
    assert main(["cancel", "cancelme"]) == 0
    cancelled_at = time.time()
    batch = _wait_batch(redis_db, "cancelme", timeout=60)
    assert batch["state"] == "cancelled"
    late = [e for e in stack.journal() if e["kind"] == "export" and e["ts"] > cancelled_at + 1.0]
    assert late == []
    submitted = int(batch["submitted"])
    assert 40 <= submitted < 300
    storage = Storage(stack.env["STORAGE_URL"])
    rows = list(
        csv.DictReader(io.StringIO(storage.get_bytes("batches/cancelme/summary.csv").decode()))
    )
    assert sorted(r["export_key"] for r in rows) == keys  # every key is listed
    states = [r["state"] for r in rows]
    assert states.count("cancelled") == 300 - int(batch["done"]) - int(batch["failed"])
    assert int(batch["done"]) + int(batch["failed"]) == submitted
