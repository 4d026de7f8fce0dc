"""The parts one worker process uses, built once per process from the settings."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import redis

from worker.apsis import ApsisClient, Limits
from worker.config import Settings, load_settings
from worker.inbox import Inbox
from worker.jobs import JobStore
from worker.logs import key_ref
from worker.ratelimit import Limit, RateLimiter
from worker.storage import Storage

#: Seconds a Redis command may take before the call fails (and the task retries).
REDIS_SOCKET_TIMEOUT = 10.0


def redis_client(url: str) -> redis.Redis:
    """A client with timeouts, so an unreachable Redis is an error rather than a hang."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=REDIS_SOCKET_TIMEOUT,
        socket_timeout=REDIS_SOCKET_TIMEOUT,
        health_check_interval=30,
    )


@dataclass
class Runtime:
    """Settings plus the clients built from them; one per process (rebuilt after a fork)."""

    settings: Settings
    redis: redis.Redis
    jobs: JobStore
    inbox: Inbox
    limiter: RateLimiter
    storage: Storage
    _apsis: ApsisClient | None = field(default=None, repr=False)

    @property
    def apsis(self) -> ApsisClient:
        if self._apsis is None:
            s = self.settings.require("APSIS_CLIENT_ID", "APSIS_CLIENT_SECRET")
            self._apsis = ApsisClient(
                base_url=s.APSIS_BASE_URL,
                client_id=s.APSIS_CLIENT_ID or "",
                client_secret=s.APSIS_CLIENT_SECRET or "",
                account=s.APSIS_ACCOUNT,
                redis_client=self.redis,
                limiter=self.limiter,
                limits=limits_from(s),
            )
        return self._apsis

    def key_ref(self, export_key: str) -> str:
        secret = (self.settings.CALLBACK_SECRET or "unkeyed").encode()
        return key_ref(export_key, secret)


def limits_from(settings: Settings) -> Limits:
    return Limits(
        export=Limit(settings.APSIS_EXPORT_RATE, 1.0),
        download=Limit(settings.APSIS_DOWNLOAD_RATE, 60.0),
        token=Limit(settings.APSIS_TOKEN_RATE, 60.0),
    )


def build_runtime(settings: Settings | None = None) -> Runtime:
    settings = settings or load_settings()
    client = redis_client(settings.REDIS_URL)
    return Runtime(
        settings=settings,
        redis=client,
        jobs=JobStore(client),
        inbox=Inbox(client),
        limiter=RateLimiter(client),
        storage=Storage(settings.STORAGE_URL),
    )


@functools.cache
def _runtime_for_pid(pid: int) -> Runtime:
    return build_runtime()


def get_runtime() -> Runtime:
    """This process's runtime, built on first use (and again in a forked child)."""
    return _runtime_for_pid(os.getpid())
