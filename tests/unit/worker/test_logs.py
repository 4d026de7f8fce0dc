"""worker/telemetry/logs.py: JSON lines, and which library lines a worker writes."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from worker.telemetry.logs import JsonFormatter, configure_logging

CELERY_PER_TASK = ("celery.app.trace", "celery.worker.strategy")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    named = {n: logging.getLogger(n).level for n in ("celery", *CELERY_PER_TASK)}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, was in named.items():
        logging.getLogger(name).setLevel(was)


def test_celerys_two_lines_per_task_are_not_written_at_info() -> None:
    configure_logging("INFO", json_lines=True)
    for name in CELERY_PER_TASK:
        assert not logging.getLogger(name).isEnabledFor(logging.INFO)
        assert logging.getLogger(name).isEnabledFor(logging.ERROR)  # a failed task still is
    assert logging.getLogger("apsis.pipeline").isEnabledFor(logging.INFO)


def test_debug_shows_celerys_per_task_lines_again() -> None:
    configure_logging("DEBUG", json_lines=True)
    for name in CELERY_PER_TASK:
        assert logging.getLogger(name).isEnabledFor(logging.INFO)


def test_each_line_carries_its_own_time_to_the_millisecond() -> None:
    formatter = JsonFormatter()
    stamps = []
    for second, msecs in (
        (1_800_000_000, 250),
        (1_800_000_000, 999),
        (1_800_000_001, 500),
        (1_800_000_000, 1),
    ):
        record = logging.LogRecord("apsis.t", logging.INFO, __file__, 1, "m", None, None)
        record.created, record.msecs = second + msecs / 1000, msecs
        stamps.append(json.loads(formatter.format(record))["ts"])
    assert stamps == [
        "2027-01-15T08:00:00.250Z",
        "2027-01-15T08:00:00.999Z",
        "2027-01-15T08:00:01.500Z",
        "2027-01-15T08:00:00.001Z",
    ]
