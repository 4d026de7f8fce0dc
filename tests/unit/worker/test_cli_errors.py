"""What a user sees when ``apsis-export`` is misused: one line on stderr, the right exit code."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from job_support import clear_settings_env, patch_cli_runtime
from job_support import run_cli as run

from worker.flow.runtime import Runtime

SECRET = secrets.token_urlsafe(48)
#: Connecting to port 1 on loopback is refused at once: no wait, no server needed.
UNREACHABLE_REDIS = "redis://:hunter2@127.0.0.1:1/0"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    clear_settings_env(monkeypatch, redis_url=UNREACHABLE_REDIS)
    yield


@pytest.fixture
def fake_runtime(monkeypatch: pytest.MonkeyPatch) -> Runtime:
    """The CLI's runtime on an in-process fake Redis (no socket)."""
    return patch_cli_runtime(monkeypatch)


def one_line(err: str) -> str:
    """The whole of stderr, checked to be exactly one line and no traceback."""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert err.endswith("\n")
    assert lines[0].startswith("apsis-export: ")
    return lines[0]


def test_status_of_an_unknown_job_exits_3_with_one_line(
    capsys: pytest.CaptureFixture[str], fake_runtime: Runtime
) -> None:
    code, out, err = run(capsys, "status", "nosuchjob0000")
    assert code == 3
    assert out == ""
    assert "nosuchjob0000" in one_line(err)


@pytest.mark.parametrize(
    ("export_key", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("k" * 600, "longer than"),
        ("a\nb", "control characters"),
        ("a\x00b", "control characters"),
        ("a\u202eb", "control characters"),  # a right-to-left override hides what was typed
    ],
    ids=["empty", "blank", "600-chars", "newline", "nul", "bidi-override"],
)
def test_export_with_a_bad_key_exits_2_with_one_clear_line(
    capsys: pytest.CaptureFixture[str],
    export_key: str,
    reason: str,
) -> None:
    # Refused before anything is sent: no broker, no Redis (which is unreachable here).
    code, out, err = run(capsys, "export", export_key)
    assert code == 2
    assert out == ""
    line = one_line(err)
    assert reason in line
    assert "export key" in line
    if len(export_key) > 1 and export_key.strip():
        assert export_key not in line  # the key (personal data) is not echoed back


def test_export_with_a_bad_job_id_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "export", "x@example.com", "--job-id", "bad/id")
    assert code == 2
    assert out == ""
    assert "job id" in one_line(err)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("STORAGE_URL", "ftp://x"),
        ("APSIS_EXPORT_RATE", "abc"),
        ("APSIS_EXPORT_RATE", "0"),
        ("CALLBACK_SECRET", "short"),
        ("REDIS_URL", "http://127.0.0.1:6379"),
        ("APSIS_BASE_URL", "api.apsis.one"),
        ("LOG_LEVEL", "LOUD"),
    ],
)
def test_bad_configuration_exits_2_naming_the_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    code, out, err = run(capsys, "status", "abc")
    assert code == 2
    assert out == ""
    line = one_line(err)
    assert variable in line
    if variable == "CALLBACK_SECRET":
        assert value not in line  # a secret, even a bad one, is not echoed


def test_unreachable_redis_exits_1_naming_redis_without_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(capsys, "status", "abc")
    assert code == 1
    assert out == ""
    line = one_line(err)
    assert "Redis" in line
    assert "127.0.0.1:1" in line
    assert "hunter2" not in err


def test_worker_with_unreachable_redis_exits_1_before_celery_starts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.queue.app import app

    started: list[object] = []
    monkeypatch.setattr(app, "worker_main", lambda argv=None: started.append(argv))
    for name, value in {
        "APSIS_CLIENT_ID": "id",
        "APSIS_CLIENT_SECRET": "secret",
        "CALLBACK_BASE_URL": "https://hooks.example.com",
        "CALLBACK_SECRET": SECRET,
    }.items():
        monkeypatch.setenv(name, value)
    code, _, err = run(capsys, "worker", "--concurrency", "1")
    assert code == 1
    assert started == []
    line = one_line(err)
    assert "Redis" in line
    assert "hunter2" not in err


def test_worker_without_credentials_exits_2_naming_the_missing_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.queue.app import app

    started: list[object] = []
    monkeypatch.setattr(app, "worker_main", lambda argv=None: started.append(argv))
    code, _, err = run(capsys, "worker")
    assert code == 2
    assert started == []
    assert "APSIS_CLIENT_ID" in one_line(err)
