"""Integration fixtures: a whole local stack (sandbox, gunicorn webhook, celery workers)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from e2e_support import StackFactory

from worker.stack import LocalStack


@pytest.fixture
def make_stack(redis_db: redis.Redis, redis_url: str, tmp_path: Path) -> Iterator[StackFactory]:
    """Start a LocalStack on the test Redis with file storage in tmp_path; stopped after."""
    started: list[LocalStack] = []

    def factory(**kwargs: Any) -> LocalStack:
        kwargs.setdefault("storage_url", f"file://{tmp_path}/exports")
        kwargs.setdefault("log_dir", tmp_path)
        stack = LocalStack(redis_url=redis_url, **kwargs)
        started.append(stack)
        return stack.start()

    yield factory
    for stack in started:
        stack.stop()
