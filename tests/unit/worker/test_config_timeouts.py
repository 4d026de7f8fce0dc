"""No fetch may outlive the broker's visibility timeout.

kombu's Redis transport (ours included: the in-flight sweep covers only the moment between
taking a message and recording it) hands an unacknowledged task to another worker once it is
older than the visibility timeout, whether or not the first worker is still running it. A
fetch downloads for up to DOWNLOAD_TIMEOUT and then splits and uploads the file, so a
visibility timeout shorter than that starts a second copy of a long fetch while the first
still runs. The defaults must not allow it, and a setting that does is refused at start-up.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from worker.config import Settings, load_settings
from worker.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STORAGE_URL", "memory:///")
    monkeypatch.setenv("REDIS_URL", UNREACHABLE_REDIS)
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
    env = {k: v for k, v in os.environ.items() if k not in Settings.model_fields}
    env |= {
        "STORAGE_URL": "memory:///",
        "REDIS_URL": UNREACHABLE_REDIS,
        "CELERY_VISIBILITY_TIMEOUT": "3600",
    }
    done = subprocess.run(
        [sys.executable, "-c", "import worker.queue.app"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("apsis-export: CELERY_VISIBILITY_TIMEOUT is invalid: ")
    assert "Traceback" not in done.stderr
