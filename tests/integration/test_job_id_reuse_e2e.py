"""Issue 12: a reused job id or batch id never returns another person's export.

Real processes: the ``apsis-export`` command in a child process, Celery workers, the
webhook and the sandbox on 127.0.0.1, one real Redis.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import redis
from e2e_support import StackFactory, apsis_export

from worker.cli.stack import LocalStack
from worker.deliverable.storage import Storage

pytestmark = pytest.mark.integration


def exported_keys(stack: LocalStack, job_id: str) -> tuple[list[str], bytes]:
    """The export keys of the job's stored profiles, and its stored export file."""
    storage = Storage(stack.env["STORAGE_URL"])
    manifest = json.loads(storage.get_bytes(f"jobs/{job_id}/manifest.json"))
    source = storage.get_bytes(manifest["source"]["object"])
    return [p["export_key"] for p in manifest["profiles"]], source


def summary(stack: LocalStack, batch_id: str) -> list[dict[str, str]]:
    storage = Storage(stack.env["STORAGE_URL"])
    text = storage.get_bytes(f"batches/{batch_id}/summary.csv").decode()
    return list(csv.DictReader(io.StringIO(text)))


def test_a_job_id_like_a_batch_item_after_the_batch_gets_its_own_export(
    make_stack: StackFactory, redis_db: redis.Redis, tmp_path: Path
) -> None:
    stack = make_stack()
    dsar = tmp_path / "dsar.txt"
    dsar.write_text("dave@example.com\nerin@example.com\n")
    ran = apsis_export(stack, "batch", str(dsar), "--batch-id", "DSAR", "--no-merged", "--wait")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("DSAR done done 2 failed 0")
    assert [row["job_id"] for row in summary(stack, "DSAR")] == ["DSAR.0", "DSAR.1"]

    # The command: it once printed "DSAR-0 done" with dave's profiles.
    ran = apsis_export(
        stack, "export", "frank@example.com", "--job-id", "DSAR-0", "--no-merged", "--wait"
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("DSAR-0 done ")
    keys, source = exported_keys(stack, "DSAR-0")
    assert keys == ["frank@example.com"]
    assert b"dave@example.com" not in source

    # The batch item's own id cannot be given at all.
    ran = apsis_export(stack, "export", "frank@example.com", "--job-id", "DSAR.0", "--wait")
    assert ran.returncode == 2
    assert ran.stdout == ""
    assert ran.stderr.startswith("apsis-export: job id must be") and ran.stderr.count("\n") == 1

    # The same request again is the same job; another key under that id is refused.
    ran = apsis_export(
        stack, "export", "frank@example.com", "--job-id", "DSAR-0", "--no-merged", "--wait"
    )
    assert (ran.returncode, ran.stdout.split()[:2]) == (0, ["DSAR-0", "done"]), ran.stderr
    ran = apsis_export(stack, "export", "dave@example.com", "--job-id", "DSAR-0", "--wait")
    assert ran.returncode == 2
    assert ran.stdout == ""
    assert ran.stderr.count("\n") == 1 and "Traceback" not in ran.stderr
    assert "job id DSAR-0 is already used for a different export" in ran.stderr
    assert "dave" not in ran.stderr

    # A batch id reused for another file is refused too, and the first batch is untouched.
    other = tmp_path / "other.txt"
    other.write_text("frank@example.com\n")
    ran = apsis_export(stack, "batch", str(other), "--batch-id", "DSAR", "--wait")
    assert ran.returncode == 2
    assert "batch id DSAR is already used for a different batch" in ran.stderr
    assert ran.stderr.count("\n") == 1
    assert redis_db.hget("apsis:batch:DSAR", "total") == b"2"
    assert exported_keys(stack, "DSAR.0")[0] == ["dave@example.com"]


def test_a_batch_after_a_job_id_like_its_item_finalizes(
    make_stack: StackFactory, redis_db: redis.Redis, tmp_path: Path
) -> None:
    stack = make_stack()
    ran = apsis_export(
        stack, "export", "gina@example.com", "--job-id", "X-1", "--no-merged", "--wait"
    )
    assert ran.returncode == 0, ran.stderr

    # The other order: the feeder looped on item 1 ("job exists already") forever.
    batch = tmp_path / "x.txt"
    batch.write_text("hank@example.com\nivy@example.com\n")
    ran = apsis_export(
        stack, "batch", str(batch), "--batch-id", "X", "--no-merged", "--wait", "--timeout", "90"
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("X done done 2 failed 0")
    rows = summary(stack, "X")
    assert [(r["export_key"], r["state"], r["job_id"]) for r in rows] == [
        ("hank@example.com", "done", "X.0"),
        ("ivy@example.com", "done", "X.1"),
    ]
    assert exported_keys(stack, "X.1")[0] == ["ivy@example.com"]
    assert exported_keys(stack, "X-1")[0] == ["gina@example.com"]
