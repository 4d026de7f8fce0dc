"""The parts one worker process uses, built once per process from the settings."""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import BusyLoadingError
from redis.retry import Retry

from worker.apsis.client import ApsisClient, Limits
from worker.apsis.ratelimit import DEFAULT_MARGIN, Limit, RateLimiter
from worker.config import (
    AccountSettings,
    RedisConnection,
    Settings,
    load_settings,
    redis_connection,
)
from worker.deliverable.storage import Storage
from worker.model import purpose
from worker.model.batch_store import BatchStore
from worker.model.inbox import Inbox
from worker.model.jobs import JobStore
from worker.model.line import FETCH_PREFIX, DispatchLine
from worker.telemetry.logs import key_ref

#: Seconds a Redis command may take before the call fails (and the task retries).
REDIS_SOCKET_TIMEOUT = 10.0


#: Retries of a Redis command that met a lost connection, 0.05 s doubling to 0.5 s apart:
#: about 3 s, the length of a Redis restart. Only for workers; the webhook answers 503 at once.
RIDE_OUT_RETRIES = 9


def redis_client(
    target: RedisConnection | str,
    *,
    ride_out: bool = False,
    timeout: float = REDIS_SOCKET_TIMEOUT,
) -> redis.Redis:
    """A client with timeouts, so an unreachable Redis is an error rather than a hang.

    Every redis-py client of the product is made here, from ``Settings.redis_connection()``
    (REDIS_URL with its TLS settings; a bare URL string has only what it says itself).
    ``timeout``: seconds to connect and for each command.

    ``ride_out``: retry a command through a short outage (a restart) before failing. A task
    that fails on Redis instead is put back on the queue, which needs Redis too, and its
    failure travels back through Celery's pool while the broker connection is being reset.
    """
    retry: dict[str, Any] = {}
    if ride_out:
        retry = {
            "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), RIDE_OUT_RETRIES),
            "retry_on_error": [redis.ConnectionError, redis.TimeoutError, BusyLoadingError],
        }
    connection = redis_connection(target) if isinstance(target, str) else target
    return redis.Redis.from_url(
        connection.url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        health_check_interval=30,
        **connection.redis_kwargs(),
        **retry,
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
    batches: BatchStore
    line: DispatchLine
    #: The download line: ready jobs waiting for a download slot.
    fetches: DispatchLine
    #: Sends one of our tasks by name (set in worker processes; unit tests pass their own).
    dispatch: Callable[[str, list[Any]], None] | None = None
    _clients: dict[str, ApsisClient] = field(default_factory=dict, repr=False)

    @property
    def apsis(self) -> ApsisClient:
        """The client of the default account (APSIS_ACCOUNT)."""
        return self.apsis_for(None)

    def apsis_for(self, account: str | None) -> ApsisClient:
        """The client of a named account: its own host, credentials, token and limits."""
        name = account or self.settings.APSIS_ACCOUNT
        if name not in self._clients:
            config = self.settings.account(name)
            self._clients[name] = ApsisClient(
                base_url=config.base_url,
                client_id=config.client_id,
                client_secret=config.client_secret,
                account=name,
                redis_client=self.redis,
                limiter=self.limiter,
                limits=limits_from(config, self.settings.APSIS_RATE_MARGIN),
            )
        return self._clients[name]

    def key_ref(self, export_key: str) -> str:
        secret = (self.settings.CALLBACK_SECRET or "unkeyed").encode()
        return key_ref(export_key, secret)


def limits_from(account: AccountSettings, margin: float = DEFAULT_MARGIN) -> Limits:
    """Export requests per second; downloads and token requests per minute."""
    return Limits(
        export=Limit(account.export_rate, 1.0, margin=margin),
        download=Limit(account.download_rate, 60.0, margin=margin),
        token=Limit(account.token_rate, 60.0, margin=margin),
    )


def runtime_on(settings: Settings, client: redis.Redis, storage: Storage) -> Runtime:
    """The runtime on a given Redis client (its stores all share it) and storage."""
    jobs = JobStore(
        client,
        secrets=purpose.secrets_of(settings.CALLBACK_SECRET, settings.CALLBACK_SECRET_PREVIOUS),
    )
    return Runtime(
        settings=settings,
        redis=client,
        jobs=jobs,
        inbox=Inbox(client),
        limiter=RateLimiter(client),
        storage=storage,
        batches=BatchStore(client, jobs),
        line=DispatchLine(client),
        fetches=DispatchLine(client, prefix=FETCH_PREFIX),
    )


def build_runtime(settings: Settings | None = None) -> Runtime:
    settings = settings or load_settings()
    client = redis_client(settings.redis_connection(), ride_out=True)
    return runtime_on(settings, client, Storage.from_settings(settings))


@functools.cache
def _runtime_for_pid(pid: int) -> Runtime:
    rt = build_runtime()
    rt.dispatch = importlib.import_module("worker.queue.app").send_task
    return rt


def get_runtime() -> Runtime:
    """This process's runtime, built on first use (and again in a forked child)."""
    return _runtime_for_pid(os.getpid())
