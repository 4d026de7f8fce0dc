"""No fetch may outlive the broker's visibility timeout.

kombu's Redis transport (ours included: the in-flight sweep covers only the moment between
taking a message and recording it) hands an unacknowledged task to another worker once it is
older than the visibility timeout, whether or not the first worker is still running it. A
fetch downloads for up to DOWNLOAD_TIMEOUT and then splits and uploads the file, so a
visibility timeout shorter than that starts a second copy of a long fetch while the first
still runs. The defaults must not allow it, and a setting that does is refused at start-up.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from job_support import clear_settings_env, import_celery_app

from worker.config import load_settings
from worker.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    clear_settings_env(monkeypatch)
    yield


def test_by_default_a_fetch_that_uses_its_whole_download_time_is_not_redelivered() -> None:
    settings = load_settings()
    assert settings.CELERY_VISIBILITY_TIMEOUT >= 1.5 * settings.DOWNLOAD_TIMEOUT


@pytest.mark.parametrize(
    "overrides",
    [
        {"CELERY_VISIBILITY_TIMEOUT": 3600},  # the old default, with the default download time
        {"DOWNLOAD_TIMEOUT": 4 * 3600.0},  # a longer download, the visibility timeout left
        {"CELERY_VISIBILITY_TIMEOUT": 30, "DOWNLOAD_TIMEOUT": 30.0},
    ],
)
def test_a_visibility_timeout_a_fetch_can_outlive_is_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(**overrides)
    message = str(raised.value)
    assert message.startswith("CELERY_VISIBILITY_TIMEOUT is invalid: ")
    assert "DOWNLOAD_TIMEOUT" in message


def test_a_short_visibility_timeout_is_accepted_with_a_short_enough_download_time() -> None:
    settings = load_settings(CELERY_VISIBILITY_TIMEOUT=30, DOWNLOAD_TIMEOUT=20.0)
    assert (settings.CELERY_VISIBILITY_TIMEOUT, settings.DOWNLOAD_TIMEOUT) == (30, 20.0)


def test_the_celery_worker_refuses_to_start_with_such_a_setting() -> None:
    """``celery -A worker worker`` reads the settings when worker.queue.app is imported."""
    done = import_celery_app(CELERY_VISIBILITY_TIMEOUT="3600")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("apsis-export: CELERY_VISIBILITY_TIMEOUT is invalid: ")
    assert "Traceback" not in done.stderr
