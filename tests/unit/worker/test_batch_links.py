"""worker/flow/batches.py + pipeline: a merged key that is an item of the same batch is linked."""

from __future__ import annotations

import json

from job_support import export_body, make_runtime, run_job

from worker.flow import batches
from worker.flow.batch_file import BatchItem
from worker.model import batch_store
from worker.model.jobs import ExportOptions

A = "ann@example.com"
MERGED = "ann.old@example.com"
B = "bob@example.com"


def test_a_merged_key_of_the_batch_is_linked_and_its_item_not_requested_again() -> None:
    rt = make_runtime(APSIS_CLIENT_ID="id", APSIS_CLIENT_SECRET="secret")
    items = [BatchItem(export_key=k, reference=None) for k in (A, MERGED, B)]
    assert batches.create(rt, "b1", items, options=ExportOptions())
    run_job(rt, "b1.0", export_key=A, batch_id="b1", body=export_body(A, merged=[MERGED, B]))
    body = json.loads(rt.storage.get_bytes("jobs/b1.0/manifest.json"))
    entries = {p["export_key"]: p for p in body["profiles"]}
    assert "batch_item" not in entries[A]
    assert entries[MERGED]["batch_item"] == 1 and "linked_job" not in entries[MERGED]
    # Every profile keeps its per-section counts, history entries included.
    assert entries[MERGED]["sections"]["s1"] == {
        "attributes": 1,
        "history_entries": 1,
        "events": 1,
    }
    # Item 1 was held as a merged profile by the finished job b1.0: counted as linked.
    rt.redis.hset(batch_store.batch_key("b1"), "submitted", 1)
    assert rt.batches.skip_if_linked("b1", 1)
    batch = rt.batches.get("b1")
    assert (batch.submitted, batch.linked, batch.in_flight) == (2, 1, 0)
    row = batches._summary_row(rt, batch, 1)
    assert row[0] == MERGED and row[2] == "linked" and row[-1] == "b1.0"


def test_a_merged_key_whose_item_already_has_a_job_names_that_job() -> None:
    rt = make_runtime(APSIS_CLIENT_ID="id", APSIS_CLIENT_SECRET="secret")
    items = [BatchItem(export_key=k, reference=None) for k in (A, B)]
    batches.create(rt, "b2", items, options=ExportOptions())
    run_job(rt, "b2.1", export_key=B, batch_id="b2")
    run_job(rt, "b2.0", export_key=A, batch_id="b2", body=export_body(A, merged=[B]))
    body = json.loads(rt.storage.get_bytes("jobs/b2.0/manifest.json"))
    merged = body["profiles"][1]
    assert (merged["batch_item"], merged["linked_job"]) == (1, "b2.1")
    assert not rt.batches.skip_if_linked("b2", 1)  # it has its own job


def test_without_include_merged_profiles_the_manifest_warns() -> None:
    rt = make_runtime()
    options = ExportOptions(include_merged_profiles=False)
    run_job(rt, "w1", export_key=A, body=export_body(A, merged=[MERGED]), options=options)
    body = json.loads(rt.storage.get_bytes("jobs/w1/manifest.json"))
    assert any("may be incomplete" in w for w in body["warnings"])
    report = json.loads(rt.storage.get_bytes("jobs/w1/report.json"))
    assert report["warnings"] == body["warnings"]
