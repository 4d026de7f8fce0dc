"""Integration fixtures: a whole local stack (sandbox, gunicorn webhook, celery workers)
and an S3 protocol server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from e2e_support import StackFactory
from moto.server import ThreadedMotoServer

from worker.cli.stack import LocalStack


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


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """An S3 protocol server (moto) on 127.0.0.1, one per test module; its endpoint URL."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
