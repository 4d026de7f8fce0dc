"""Tests for worker/apsis/bearer.py: the pool's shared token, its renewal and its single flight."""

from __future__ import annotations

import threading
from typing import Any

import fakeredis
import pytest

from sandbox import jwt
from worker.apsis.bearer import BearerToken, TokenCache, jwt_times
from worker.errors import ApsisAuthError, RetryableApsisError

HOUR = 3600.0
DAY = 24 * HOUR
START = 1_700_000_000.0


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Issuer:
    """Stands in for APSIS's token endpoint: each fetch issues a new token of ``lifetime``."""

    def __init__(self, clock: Clock, lifetime: float = DAY) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.fetches = 0

    def __call__(self) -> BearerToken:
        self.fetches += 1
        now = self.clock()
        return BearerToken(f"token-{self.fetches}", now, now + self.lifetime)


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def cache_for(server: fakeredis.FakeServer, fetch: Issuer, clock: Clock) -> TokenCache:
    """One process's view of the shared cache (its own Redis connection)."""
    return TokenCache(fakeredis.FakeRedis(server=server), "acct", fetch, clock=clock)


def test_the_cached_token_is_reused(server: fakeredis.FakeServer, clock: Clock) -> None:
    issuer = Issuer(clock)
    first, second = cache_for(server, issuer, clock), cache_for(server, issuer, clock)
    assert first.get() == "token-1"
    clock.now += HOUR
    assert first.get() == second.get() == "token-1"
    assert issuer.fetches == 1


def test_accounts_have_separate_tokens(server: fakeredis.FakeServer, clock: Clock) -> None:
    issuer = Issuer(clock)
    redis_client = fakeredis.FakeRedis(server=server)
    assert TokenCache(redis_client, "one", issuer, clock=clock).get() == "token-1"
    assert TokenCache(redis_client, "two", issuer, clock=clock).get() == "token-2"


def test_a_24h_token_is_renewed_only_in_its_last_tenth(
    server: fakeredis.FakeServer, clock: Clock
) -> None:
    issuer = Issuer(clock, lifetime=DAY)
    cache = cache_for(server, issuer, clock)
    cache.get()
    clock.now = START + 20 * HOUR
    assert cache.get() == "token-1"
    clock.now = START + 21.5 * HOUR
    assert cache.get() == "token-1"
    clock.now = START + 22 * HOUR
    assert cache.get() == "token-2"
    assert issuer.fetches == 2


def test_a_60s_token_is_renewed_near_54s(server: fakeredis.FakeServer, clock: Clock) -> None:
    issuer = Issuer(clock, lifetime=60.0)
    cache = cache_for(server, issuer, clock)
    cache.get()
    clock.now = START + 53.9
    assert cache.get() == "token-1"
    clock.now = START + 54.1
    assert cache.get() == "token-2"


def test_while_another_process_renews_the_current_token_is_still_served(
    server: fakeredis.FakeServer, clock: Clock
) -> None:
    issuer = Issuer(clock)
    cache = cache_for(server, issuer, clock)
    cache.get()
    # Another process holds the refresh lock; our token is due for renewal but still valid.
    fakeredis.FakeRedis(server=server).set("apsis:token-lock:acct", "someone-else", px=30_000)
    clock.now = START + 23 * HOUR
    assert cache.get() == "token-1"
    assert issuer.fetches == 1


def test_concurrent_callers_fetch_once_and_share_the_token(
    server: fakeredis.FakeServer, clock: Clock
) -> None:
    fetching, release = threading.Event(), threading.Event()
    issuer = Issuer(clock)

    def slow_fetch() -> BearerToken:
        fetching.set()
        assert release.wait(5)
        return issuer()

    leader = TokenCache(fakeredis.FakeRedis(server=server), "acct", slow_fetch, clock=clock)
    follower = cache_for(server, issuer, clock)
    got: dict[str, str] = {}
    threads = [
        threading.Thread(target=lambda: got.update(leader=leader.get())),
        threading.Thread(target=lambda: got.update(follower=follower.get())),
    ]
    threads[0].start()
    assert fetching.wait(5)
    threads[1].start()  # finds no token and the lock taken: it must wait, not fetch
    threads[1].join(0.2)
    assert threads[1].is_alive()
    release.set()
    for thread in threads:
        thread.join(5)
    assert got == {"leader": "token-1", "follower": "token-1"}
    assert issuer.fetches == 1


def test_waiting_for_a_refresh_that_never_comes_gives_up(
    server: fakeredis.FakeServer,
) -> None:
    class Racing(Clock):
        def __call__(self) -> float:
            self.now += 5.0
            return self.now

    clock = Racing()
    issuer = Issuer(clock)
    fakeredis.FakeRedis(server=server).set("apsis:token-lock:acct", "stuck", px=30_000)
    with pytest.raises(RetryableApsisError):
        cache_for(server, issuer, clock).get()
    assert issuer.fetches == 0


def test_a_failed_fetch_releases_the_lock_for_the_next_caller(
    server: fakeredis.FakeServer, clock: Clock
) -> None:
    issuer = Issuer(clock)

    def failing() -> BearerToken:
        raise RetryableApsisError("APSIS token: HTTP 503")

    with pytest.raises(RetryableApsisError):
        TokenCache(fakeredis.FakeRedis(server=server), "acct", failing, clock=clock).get()
    assert cache_for(server, issuer, clock).get() == "token-1"


def test_invalidate_drops_only_the_token_that_failed(
    server: fakeredis.FakeServer, clock: Clock
) -> None:
    issuer = Issuer(clock)
    cache = cache_for(server, issuer, clock)
    stale = cache.get()
    cache.invalidate("a-token-someone-else-saw-fail")
    assert cache.get() == stale
    cache.invalidate(stale)
    fresh = cache.get()
    assert fresh == "token-2"
    cache.invalidate(stale)  # a late 401 for the old token must not drop the new one
    assert cache.get() == fresh
    assert issuer.fetches == 2


class _CountingRedis(fakeredis.FakeRedis):
    gets = 0

    def get(self, name: Any) -> Any:
        self.gets += 1
        return super().get(name)


def test_a_process_serves_its_token_without_asking_redis_until_renewal(
    server: fakeredis.FakeServer, clock: Clock
) -> None:
    issuer = Issuer(clock)
    client = _CountingRedis(server=server)
    cache = TokenCache(client, "acct", issuer, clock=clock)
    assert cache.get() == "token-1"
    asked = client.gets
    clock.now = START + 21 * HOUR
    assert [cache.get() for _ in range(50)] == ["token-1"] * 50
    assert client.gets == asked
    clock.now = START + 23 * HOUR  # its last tenth: renewed through the pool's cache
    assert cache.get() == "token-2"
    assert issuer.fetches == 2


def test_a_token_another_process_replaced_is_served_until_apsis_refuses_it(
    server: fakeredis.FakeServer, clock: Clock
) -> None:
    issuer = Issuer(clock)
    ours, theirs = cache_for(server, issuer, clock), cache_for(server, issuer, clock)
    assert ours.get() == "token-1"
    theirs.invalidate(theirs.get())  # APSIS refused token-1 to them
    assert theirs.get() == "token-2"
    assert ours.get() == "token-1"  # still within its lifetime: no call to Redis
    ours.invalidate("token-1")  # and refused to us too
    assert ours.get() == "token-2"
    assert issuer.fetches == 2


class _RacingRedis(fakeredis.FakeRedis):
    """Runs ``meanwhile`` once, between reading the cached token and handing it back."""

    meanwhile: Any = None

    def get(self, name: Any) -> Any:
        value = super().get(name)
        if self.meanwhile is not None:
            then, self.meanwhile = self.meanwhile, None
            then()
        return value


def test_a_token_refused_while_another_thread_read_it_is_not_kept(
    server: fakeredis.FakeServer, clock: Clock
) -> None:
    issuer = Issuer(clock)
    assert cache_for(server, issuer, clock).get() == "token-1"  # in the pool's cache
    client = _RacingRedis(server=server)
    cache = TokenCache(client, "acct", issuer, clock=clock)
    # This thread reads token-1 from Redis; before it keeps it, APSIS refuses token-1 to
    # another thread of the process, which drops it. Its retry must get a new token.
    client.meanwhile = lambda: cache.invalidate("token-1")
    assert cache.get() == "token-1"
    assert cache.get() == "token-2"
    assert issuer.fetches == 2


def test_an_already_expired_token_is_refused(server: fakeredis.FakeServer, clock: Clock) -> None:
    def expired() -> BearerToken:
        return BearerToken("old", START - 2 * DAY, START - DAY)

    with pytest.raises(ApsisAuthError):
        TokenCache(fakeredis.FakeRedis(server=server), "acct", expired, clock=clock).get()


KEY = b"k" * 32


def test_jwt_times_reads_iat_and_exp() -> None:
    token = jwt.sign({"iat": 1000, "exp": 4600, "sub": "x"}, KEY)
    assert jwt_times(token, fetched_at=999.0, expires_in=86_400) == (1000.0, 4600.0)


def test_jwt_times_without_iat_counts_from_the_fetch() -> None:
    token = jwt.sign({"exp": 4600}, KEY)
    assert jwt_times(token, fetched_at=1000.0, expires_in=None) == (1000.0, 4600.0)


@pytest.mark.parametrize(
    "token",
    ["opaque-token", "a.!!!.c", jwt.sign({"sub": "no exp"}, KEY), "e30.bm90IGpzb24.x"],
)
def test_jwt_times_falls_back_to_expires_in(token: str) -> None:
    assert jwt_times(token, fetched_at=1000.0, expires_in=60.0) == (1000.0, 1060.0)


def test_a_token_with_no_expiry_at_all_is_an_auth_error() -> None:
    with pytest.raises(ApsisAuthError):
        jwt_times("opaque-token", fetched_at=1000.0, expires_in=None)
