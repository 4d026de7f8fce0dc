"""Tests for worker/apsis/ratelimit.py: the pool-wide GCRA buckets in Redis."""

from __future__ import annotations

import fakeredis
import pytest

from worker.apsis.ratelimit import RATE_SAFETY, Limit, RateLimiter

#: Slack for the real time between two calls (fakeredis's TIME is the wall clock).
SLACK = 0.01


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def limiter(server: fakeredis.FakeServer) -> RateLimiter:
    return RateLimiter(fakeredis.FakeRedis(server=server))


def test_the_interval_includes_the_safety_margin() -> None:
    assert Limit(1, 1.0).interval == pytest.approx(1 / RATE_SAFETY)
    assert Limit(60, 60.0).interval == pytest.approx(1 / RATE_SAFETY)
    assert 1.0 < Limit(20, 1.0).interval * 20 <= 1.05  # a margin, and not a wasteful one


def test_acquisitions_are_spaced_by_the_interval(limiter: RateLimiter) -> None:
    limit = Limit(1, 1.0)  # the documented export rate: one slot every 1/RATE_SAFETY s
    slots = [limiter.acquire("acct", "export", limit, max_wait=10.0) for _ in range(4)]
    assert all(slot.granted for slot in slots)
    for n, slot in enumerate(slots):
        # Exact pacing would be 0, 1, 2, 3 s; the margin spaces them a little wider.
        assert n * limit.interval - SLACK <= slot.wait <= n * limit.interval


def test_processes_share_one_bucket(server: fakeredis.FakeServer) -> None:
    first = RateLimiter(fakeredis.FakeRedis(server=server))
    second = RateLimiter(fakeredis.FakeRedis(server=server))
    limit = Limit(1, 1.0)
    assert first.acquire("acct", "export", limit, max_wait=5.0).wait == 0.0
    assert second.acquire("acct", "export", limit, max_wait=5.0).wait > 1.0


def test_a_wait_beyond_max_wait_is_not_granted_and_says_when_to_ask_again(
    limiter: RateLimiter,
) -> None:
    limit = Limit(1, 1.0)
    assert limiter.acquire("acct", "export", limit, max_wait=1.5).wait == 0.0
    assert limiter.acquire("acct", "export", limit, max_wait=1.5).granted
    # The next slot is 2.04 s away: 0.54 s more than the caller will wait.
    for _ in range(2):  # a refused call reserves nothing, so asking again gets the same hint
        refused = limiter.acquire("acct", "export", limit, max_wait=1.5)
        assert not refused.granted
        assert 2 * limit.interval - 1.5 - SLACK <= refused.wait <= 2 * limit.interval - 1.5


def test_buckets_are_per_account_and_per_kind(limiter: RateLimiter) -> None:
    limit = Limit(1, 1.0)
    assert limiter.acquire("acct-a", "export", limit, max_wait=0.0).granted
    assert not limiter.acquire("acct-a", "export", limit, max_wait=0.0).granted
    assert limiter.acquire("acct-b", "export", limit, max_wait=0.0).wait == 0.0
    assert limiter.acquire("acct-a", "download", limit, max_wait=0.0).wait == 0.0


def test_a_burst_admits_that_many_back_to_back(limiter: RateLimiter) -> None:
    limit = Limit(1, 1.0, burst=3)
    slots = [limiter.acquire("acct", "other", limit, max_wait=0.0) for _ in range(3)]
    assert [(slot.granted, slot.wait) for slot in slots] == [(True, 0.0)] * 3
    fourth = limiter.acquire("acct", "other", limit, max_wait=5.0)
    assert limit.interval - SLACK <= fourth.wait <= limit.interval


def test_an_idle_bucket_expires(server: fakeredis.FakeServer, limiter: RateLimiter) -> None:
    limiter.acquire("acct", "export", Limit(1, 1.0), max_wait=0.0)
    ttl_ms = fakeredis.FakeRedis(server=server).pttl("apsis:rate:acct:export")
    assert 0 < ttl_ms <= 3_000
