"""Text from outside (APSIS failure messages, references, file names) never reaches the
operator's terminal raw: ``apsis-export`` shows control characters as visible escapes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from job_support import clear_settings_env, patch_cli_runtime
from job_support import run_cli as run

from worker.flow import batches, pipeline
from worker.flow.batch_file import BatchItem
from worker.flow.runtime import Runtime
from worker.model.jobs import ExportOptions, State

#: Clears the screen, sets the window title and prints a fake green "done" line.
EVIL = "Export failed\x1b[2J\x1b]0;pwned\x07\r\n\x1b[32mstate     done\x1b[0m\u202e"
#: The same text as the operator sees it.
SHOWN = "Export failed\\x1b[2J\\x1b]0;pwned\\x07\\r\\n\\x1b[32mstate     done\\x1b[0m\\u202e"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    clear_settings_env(monkeypatch)  # its Redis is replaced by fakeredis
    monkeypatch.setenv("CALLBACK_SECRET", "dGVybWluYWwtZXNjYXBlcy1hcmUtbm90LWZvci10aGUtdHR5")
    yield


@pytest.fixture
def rt(monkeypatch: pytest.MonkeyPatch) -> Runtime:
    return patch_cli_runtime(
        monkeypatch, APSIS_CLIENT_ID="id", APSIS_CLIENT_SECRET="Zk8qR2vLx0pW7mN3"
    )


def assert_harmless(text: str) -> None:
    """No escape, no carriage return, no bidi override: only printable text and newlines."""
    assert all(ch == "\n" or ch.isprintable() for ch in text), repr(text)


def _failed_job(rt: Runtime, job_id: str = "j1", *, reference: str | None = None) -> None:
    pipeline.submit(
        rt, "key@example.com", options=ExportOptions(), job_id=job_id, reference=reference
    )
    rt.jobs.transition(job_id, State.REQUESTED)
    # What the pipeline does with a failure callback: the job keeps APSIS's text.
    assert pipeline.fail(rt, job_id, f"APSIS reported failure code 500: {EVIL}")


def test_status_shows_apsis_text_escaped(capsys: pytest.CaptureFixture[str], rt: Runtime) -> None:
    _failed_job(rt, reference=f"ticket-1{EVIL}")
    code, out, err = run(capsys, "status", "j1")
    assert code == 0 and err == ""
    assert_harmless(out)
    lines = out.splitlines()
    assert f"error     APSIS reported failure code 500: {SHOWN}" in lines
    assert f"reference ticket-1{SHOWN}" in lines
    assert any(
        line.endswith(f"failed     APSIS reported failure code 500: {SHOWN}") for line in lines
    )
    # No line of its own pretends the job is done.
    assert [line for line in lines if line.startswith("state")] == ["state     failed"]


def test_batch_status_shows_the_reference_escaped(
    capsys: pytest.CaptureFixture[str], rt: Runtime
) -> None:
    items = [BatchItem(export_key="a@example.com", reference=None)]
    assert batches.create(rt, "b1", items, options=ExportOptions(), reference=f"dsar{EVIL}")
    code, out, err = run(capsys, "status", "b1")
    assert code == 0 and err == ""
    assert_harmless(out)
    assert f"reference dsar{SHOWN}" in out.splitlines()


def test_export_wait_prints_the_failure_escaped(
    capsys: pytest.CaptureFixture[str], rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.queue.app import app

    # The same request was made before and has failed: --wait reports it at once.
    _failed_job(rt, "j2")
    monkeypatch.setattr(app, "send_task", lambda *args, **kwargs: None)
    code, out, err = run(capsys, "export", "key@example.com", "--job-id", "j2", "--wait")
    assert code == 1
    assert_harmless(out + err)
    assert out == f"j2 failed APSIS reported failure code 500: {SHOWN}\n"


def test_the_error_line_shows_a_file_name_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    # A batch file saved under a name someone else chose.
    code, out, err = run(capsys, "batch", "/nonexistent/keys\x1b[2J\x1b]0;pwned\x07.csv")
    assert code == 2 and out == ""
    assert_harmless(err)
    assert err.startswith(
        "apsis-export: cannot read /nonexistent/keys\\x1b[2J\\x1b]0;pwned\\x07.csv"
    )
    assert len(err.splitlines()) == 1
