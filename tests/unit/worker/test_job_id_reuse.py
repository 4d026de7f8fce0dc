"""A reused job id or batch id is refused unless it asks for the same export (issue 12).

Job ids are idempotency keys: the same request twice is one job. A different request under
an existing id must never be answered with that job's export (another person's data), and a
batch's item ids (``<batch>.<n>``) are a form no caller's ``--job-id`` can take.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from job_support import FeedApsis, make_runtime, patch_cli_runtime

from worker.cli import commands as cli
from worker.config import Settings
from worker.errors import InvalidExportKey, JobIdConflict
from worker.flow import batches, feeder, pipeline
from worker.flow.batch_file import BatchItem
from worker.flow.runtime import Runtime
from worker.model import batch_store, callback_token, ids
from worker.model.jobs import ExportOptions, State

SECRET = "T3ZqZ0tXbXlVb0VjZ1pSd0Nqc2F0ZXN0LW9ubHk4NzY1"
OPENAPI = Path(__file__).resolve().parents[3] / "webhook" / "openapi.yaml"


# -- the id forms -------------------------------------------------------------------------


def test_a_batch_items_job_id_cannot_be_given_by_a_caller() -> None:
    assert batch_store.job_id_for("DSAR", 0) == "DSAR.0"
    with pytest.raises(InvalidExportKey, match="job id"):
        ids.validate_new_job_id("DSAR.0")
    assert ids.validate_new_job_id("DSAR-0") == "DSAR-0"  # a caller's id, not an item's
    # Looking a batch item's job up (status, retry, verify) still works.
    assert ids.validate_job_id("DSAR.0") == "DSAR.0"
    rt = make_runtime()
    with pytest.raises(InvalidExportKey):  # a caller's export_profile task alike
        pipeline.submit(rt, "frank@example.com", options=ExportOptions(), job_id="DSAR.0")
    assert not rt.jobs.exists("DSAR.0")


def test_a_callback_token_for_a_batch_items_job_verifies() -> None:
    token = callback_token.issue("DSAR.12", 2, secret=SECRET, ttl=60, now=1000.0)
    claim = callback_token.verify(token, secrets=(SECRET,), now=1000.0)
    assert (claim.job_id, claim.attempt) == ("DSAR.12", 2)
    # The webhook's documented path pattern takes the same tokens.
    spec = yaml.safe_load(OPENAPI.read_text())
    parameter = spec["paths"]["/callbacks/{token}"]["parameters"][0]
    pattern = re.compile(parameter["schema"]["pattern"])
    assert pattern.match(token)
    assert pattern.match(callback_token.issue("job-1", 1, secret=SECRET, ttl=60))
    for bad in ("DSAR.01.1.1.mac", "DS-AR.1.1.1.mac", "a.b.1.1.mac"):
        assert not pattern.match(bad)
        with pytest.raises(callback_token.InvalidCallbackToken):
            callback_token.verify(bad, secrets=(SECRET,))


# -- batch ids ----------------------------------------------------------------------------


def _items(*keys: str) -> list[BatchItem]:
    return [BatchItem(key) for key in keys]


def test_a_reused_batch_id_for_another_batch_is_refused() -> None:
    rt = make_runtime(APSIS_CLIENT_ID="id", APSIS_CLIENT_SECRET="secret")
    dave = _items("dave@example.com", "erin@example.com")
    assert batches.create(rt, "DSAR", dave, options=ExportOptions())
    # The same batch again is the same batch (a redelivered task, a re-run command).
    assert not batches.create(rt, "DSAR", dave, options=ExportOptions(), reference="again")
    with pytest.raises(JobIdConflict, match="batch id DSAR is already used for a different"):
        batches.create(rt, "DSAR", _items("frank@example.com"), options=ExportOptions())
    with pytest.raises(JobIdConflict):
        batches.create(rt, "DSAR", dave, options=ExportOptions(include_attribute_history=True))
    batch = rt.batches.get("DSAR")
    assert batch.total == 2 and batch.state == "running"


# -- the feeder ---------------------------------------------------------------------------


def test_the_feeder_fails_an_item_whose_job_id_is_taken_once_and_finishes() -> None:
    rt = make_runtime(
        CALLBACK_BASE_URL="https://hooks.example.com",
        APSIS_EXPORT_RATE="1000",
        APSIS_CLIENT_ID="id",
        APSIS_CLIENT_SECRET="secret",
    )
    apsis = FeedApsis()
    rt._clients[rt.settings.APSIS_ACCOUNT] = apsis
    # A record under item 1's id that this batch did not create (say, left from an earlier
    # batch of that id): it is frank's, not the batch's.
    rt.jobs.create(
        "X.1",
        export_key="frank@example.com",
        account=rt.settings.APSIS_ACCOUNT,
        options=ExportOptions(),
        deadline_seconds=3600,
    )
    rt.jobs.update("X.1", {"manifest": "file:///exports/jobs/X.1/manifest.json"})
    items = _items("anna@example.com", "bert@example.com", "cora@example.com")
    assert batches.create(rt, "X", items, options=ExportOptions())
    later: list[tuple[str, list[Any], float]] = []

    def dispatch_later(name: str, args: list[Any], delay: float) -> None:
        later.append((name, args, delay))

    for _ in range(3):  # fed again and again: the item is counted once, never retried
        assert feeder.serve(rt, rt.settings.APSIS_ACCOUNT, dispatch_later) is None
    batch = rt.batches.get("X")
    assert (batch.submitted, batch.failed, batch.in_flight) == (3, 1, 2)
    assert apsis.requested == ["anna@example.com", "cora@example.com"]  # no request for 1
    assert rt.jobs.get("X.1").export_key == "frank@example.com"  # untouched

    # The other two end; the summary reports item 1 failed with the reason, not frank's job.
    for job_id in ("X.0", "X.2"):
        rt.jobs.transition(job_id, State.FAILED, note="test")
    assert rt.batches.get("X").complete
    assert batches.finalize(rt, "X", lambda chain, result: None)
    text = rt.storage.get_bytes(batches.summary_object("X")).decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows[1]["export_key"] == "bert@example.com"
    assert rows[1]["state"] == "failed"
    assert rows[1]["reason"].startswith("refused: job id X.1 exists already")
    assert "frank" not in text and "X.1/manifest" not in text


# -- the command line ---------------------------------------------------------------------


@pytest.fixture
def cli_runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    """The CLI on an in-process fake Redis."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STORAGE_URL", "memory:///")
    monkeypatch.setenv("CALLBACK_SECRET", SECRET)
    monkeypatch.setenv("APSIS_CLIENT_ID", "id")
    monkeypatch.setenv("APSIS_CLIENT_SECRET", "secret")
    yield patch_cli_runtime(monkeypatch)


def _sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    from worker.queue.app import app

    sent: list[tuple[str, Any]] = []
    monkeypatch.setattr(app, "send_task", lambda name, **kw: sent.append((name, kw)))
    return sent


def test_export_with_a_job_id_in_use_for_another_key_exits_2_and_queues_nothing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, cli_runtime: Runtime
) -> None:
    sent = _sent(monkeypatch)
    account = cli_runtime.settings.APSIS_ACCOUNT
    assert cli.main(["export", "dave@example.com", "--job-id", "ticket-7"]) == 0
    assert capsys.readouterr().out == "ticket-7\n"
    assert cli_runtime.line.place(account, "ticket-7") is not None  # in the dispatch line
    # The same request again: the same job, exit 0.
    assert cli.main(["export", "dave@example.com", "--job-id", "ticket-7"]) == 0
    capsys.readouterr()

    code = cli.main(["export", "frank@example.com", "--job-id", "ticket-7", "--wait"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("apsis-export: job id ticket-7 is already used for a different export")
    assert "dave" not in err and "frank" not in err
    assert sent == []  # no task: the request waits in the line, and only once
    assert cli_runtime.line.lengths(account)["single"] == 1
    assert cli_runtime.jobs.get("ticket-7").export_key == "dave@example.com"


def test_export_with_a_batch_items_job_id_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, cli_runtime: Runtime
) -> None:
    sent = _sent(monkeypatch)
    code = cli.main(["export", "frank@example.com", "--job-id", "DSAR.0", "--wait"])
    _, err = capsys.readouterr()
    assert code == 2
    assert "job id" in err and err.count("\n") == 1
    assert sent == [] and not cli_runtime.jobs.exists("DSAR.0")


def test_batch_with_a_batch_id_in_use_for_another_file_exits_2(
    capsys: pytest.CaptureFixture[str], cli_runtime: Runtime, tmp_path: Path
) -> None:
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("dave@example.com\nerin@example.com\n")
    second.write_text("frank@example.com\n")
    assert cli.main(["batch", str(first), "--batch-id", "DSAR"]) == 0
    assert capsys.readouterr().out == "DSAR\n"
    assert cli.main(["batch", str(first), "--batch-id", "DSAR"]) == 0  # the same batch
    capsys.readouterr()

    code = cli.main(["batch", str(second), "--batch-id", "DSAR", "--wait"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "batch id DSAR is already used for a different batch" in err
    assert cli_runtime.batches.get("DSAR").total == 2
