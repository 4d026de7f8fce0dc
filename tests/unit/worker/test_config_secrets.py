"""Placeholder and weak secrets are refused at start-up; secrets never show in the settings.

Deployed as shipped (deploy/k8s/secrets.yaml), the webhook would hand its /status page to
anyone sending ``Bearer REPLACE_ME`` and the public placeholder CALLBACK_SECRET would let
anyone forge callbacks. Every process refuses to start instead: one line, exit code 2.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import yaml
from job_support import ROOT, clear_settings_env, import_celery_app

from worker.cli import commands as cli
from worker.config import Settings, load_settings
from worker.errors import ConfigError

SHIPPED_SECRETS: dict[str, str] = yaml.safe_load(
    (ROOT / "deploy" / "k8s" / "secrets.yaml").read_text()
)["stringData"]
#: The shipped placeholders the settings read (AWS_* go to the storage library).
SHIPPED_PLACEHOLDERS = sorted(
    (name, value)
    for name, value in SHIPPED_SECRETS.items()
    if name in Settings.model_fields and value and name != "REDIS_URL"
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    clear_settings_env(monkeypatch)
    yield


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("apsis-export: ")
    return lines[0]


def test_the_shipped_secrets_file_has_the_placeholders_these_tests_cover() -> None:
    names = {name for name, _ in SHIPPED_PLACEHOLDERS}
    assert {"CALLBACK_SECRET", "STATUS_TOKEN", "APSIS_CLIENT_ID", "APSIS_CLIENT_SECRET"} <= names


@pytest.mark.parametrize(("variable", "value"), SHIPPED_PLACEHOLDERS)
@pytest.mark.parametrize("command", [["status", "abc"], ["webhook"], ["worker"]])
def test_each_shipped_placeholder_stops_every_command_with_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
    variable: str,
    value: str,
) -> None:
    # Everything else is real-looking, so the placeholder is what stops it.
    monkeypatch.setenv("CALLBACK_SECRET", secrets.token_urlsafe(48))
    monkeypatch.setenv(variable, value)
    served: list[object] = []

    def serve(*args: object) -> int:
        served.append(args)
        return 0

    monkeypatch.setattr(cli, "cmd_webhook", serve)
    monkeypatch.setattr(cli, "cmd_worker", serve)

    code = cli.main(command)
    out, err = capsys.readouterr()

    assert code == 2
    assert served == []
    assert out == ""
    line = _one_line(err)
    assert variable in line and "placeholder" in line
    assert value not in line


def test_the_celery_worker_refuses_the_shipped_callback_secret_before_starting() -> None:
    """``celery -A worker worker`` reads the settings when worker.queue.app is imported."""
    done = import_celery_app(CALLBACK_SECRET=SHIPPED_SECRETS["CALLBACK_SECRET"])
    assert done.returncode == 2, done.stderr
    line = _one_line(done.stderr)
    assert "CALLBACK_SECRET" in line
    assert SHIPPED_SECRETS["CALLBACK_SECRET"] not in line


@pytest.mark.parametrize(
    "value",
    [
        "REPLACE_ME",
        "replace-me-with-a-long-random-token-please",
        "CHANGE_ME_CHANGE_ME_CHANGE_ME_CHANGE_ME",
        "changeme" * 5,
        "your-status-token-example-value-goes-here",
        "placeholder-placeholder-placeholder",
        "x" * 48,
        "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx",
        "<a long random status token of 32 chars>",
        "${STATUS_TOKEN_FROM_THE_VAULT_FOR_THIS_ENV}",
        "abababababababababababababababababab",  # long, but 2 distinct characters
        "0123456789abcdefghijklmnopqrstu",  # 31 characters
        secrets.token_urlsafe(16),  # 22 characters
    ],
)
def test_a_weak_or_placeholder_status_token_is_refused(value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(STATUS_TOKEN=value)
    message = str(raised.value)
    assert message.startswith("STATUS_TOKEN is invalid: ")
    assert value not in message
    assert "token_urlsafe" in message  # says how to make a good one


@pytest.mark.parametrize(
    "variable", ["CALLBACK_SECRET", "CALLBACK_SECRET_PREVIOUS", "APSIS_CLIENT_SECRET"]
)
@pytest.mark.parametrize(
    "value",
    ["REPLACE_ME_WITH_48_RANDOM_URLSAFE_CHARACTERS_000000", "changeme", "x" * 48, "…"],
)
def test_placeholder_secrets_and_credentials_are_refused(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{variable} is invalid: .*placeholder"):
        load_settings(**{variable: value})


def test_a_callback_secret_of_few_distinct_characters_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"CALLBACK_SECRET is invalid: .*distinct characters"):
        load_settings(CALLBACK_SECRET="ab12" * 12)


def test_the_readme_example_of_another_account_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The README's APSIS_ACCOUNTS example has "…" for the credentials."""
    assert '"client_id": "…", "client_secret": "…"' in (ROOT / "README.md").read_text()
    example = '{"apac": {"client_id": "…", "client_secret": "…"}}'
    monkeypatch.setenv("APSIS_ACCOUNTS", example)
    with pytest.raises(ConfigError, match=r"^APSIS_ACCOUNTS\.apac\.client_id is invalid"):
        load_settings()


def test_real_looking_values_are_accepted_and_status_stays_optional() -> None:
    status_token = secrets.token_urlsafe(32)
    settings = load_settings(
        CALLBACK_SECRET=secrets.token_urlsafe(48),
        CALLBACK_SECRET_PREVIOUS=secrets.token_hex(32),
        STATUS_TOKEN=status_token,
        APSIS_CLIENT_ID="sandbox",  # what the sandbox and compose.sandbox.yaml use
        APSIS_CLIENT_SECRET="sandbox",
    )
    assert status_token == settings.STATUS_TOKEN
    # Unset or empty (compose passes ${STATUS_TOKEN:-}): the status page is off, no error.
    assert load_settings().STATUS_TOKEN is None
    assert load_settings(STATUS_TOKEN="").STATUS_TOKEN == ""


def test_secrets_never_show_in_the_settings_repr_or_str() -> None:
    values = {
        "CALLBACK_SECRET": secrets.token_urlsafe(48),
        "CALLBACK_SECRET_PREVIOUS": secrets.token_urlsafe(48),
        "STATUS_TOKEN": secrets.token_urlsafe(32),
        "APSIS_CLIENT_SECRET": secrets.token_urlsafe(24),
    }
    other_secret = secrets.token_urlsafe(24)
    settings = load_settings(
        **values,
        APSIS_CLIENT_ID="client-one",
        APSIS_ACCOUNTS={"apac": {"client_id": "client-two", "client_secret": other_secret}},
    )
    for shown in (repr(settings), str(settings), repr(settings.account("apac"))):
        for value in [*values.values(), other_secret]:
            assert value not in shown
    assert "client-one" in repr(settings)  # the rest stays readable
