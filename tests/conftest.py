"""Shared fixtures: the test Redis (REDIS_URL, else redis-server, else fakeredis TCP)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis

from worker.cli.embedded import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """REDIS_URL when given (only its database index is ever flushed), else our own server."""
    with EmbeddedRedis(url=os.environ.get("REDIS_URL") or None) as server:
        yield server.url


@pytest.fixture
def redis_db(redis_url: str) -> Iterator[redis.Redis]:
    """The test database, flushed before and after the test."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()
