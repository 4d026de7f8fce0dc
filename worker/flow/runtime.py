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
from redis.connection import parse_url
from redis.exceptions import BusyLoadingError
from redis.retry import Retry
from redis.sentinel import Sentinel

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
from worker.model.replicas import OFF, ReplicaAck
from worker.model.sentinel import PrimaryConnection, PrimarySSLConnection
from worker.telemetry.logs import key_ref

#: Seconds a Redis command may take before the call fails (and the task retries).
REDIS_SOCKET_TIMEOUT = 10.0


#: Retries of a Redis command that met a lost connection, 0.05 s doubling to 0.5 s apart:
#: about 3 s, the length of a Redis restart. Only for workers; the webhook answers 503 at once.
RIDE_OUT_RETRIES = 9
#: Through a Sentinel group, the ride-out lasts a failover instead (0.05 s doubling to 1 s
#: apart, about 17 s): sentinels notice a dead primary after their down-after-milliseconds
#: and promote a replica a few seconds later; meanwhile every command meets no primary.
FAILOVER_RIDE_OUT_RETRIES = 22


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
    connection = redis_connection(target) if isinstance(target, str) else target
    retry: dict[str, Any] = {}
    if ride_out:
        backoff, retries = (
            (ExponentialBackoff(cap=1.0, base=0.05), FAILOVER_RIDE_OUT_RETRIES)
            if connection.sentinels
            else (ExponentialBackoff(cap=0.5, base=0.05), RIDE_OUT_RETRIES)
        )
        retry = {
            "retry": Retry(backoff, retries),
            "retry_on_error": [redis.ConnectionError, redis.TimeoutError, BusyLoadingError],
        }
    if connection.sentinels:
        return _sentinel_client(connection, timeout=timeout, retry=retry)
    return redis.Redis.from_url(
        connection.url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        health_check_interval=30,
        **connection.redis_kwargs(),
        **retry,
    )


def _sentinel_client(
    connection: RedisConnection, *, timeout: float, retry: dict[str, Any]
) -> redis.Redis:
    """A client of the primary the sentinels name: on a lost connection (or a READONLY
    answer from a demoted primary) it asks them again, so it follows a failover by itself.
    The URL's ACL user, password and database apply to the primary; TLS to both."""
    parts = parse_url(connection.url)  # type: ignore[no-untyped-call]
    timeouts = {"socket_connect_timeout": timeout, "socket_timeout": timeout}
    group = Sentinel(  # type: ignore[no-untyped-call]
        list(connection.sentinels),
        sentinel_kwargs={**timeouts, **connection.sentinel_kwargs()},
        **timeouts,
    )
    primary: dict[str, Any] = {
        name: parts[name] for name in ("username", "password", "db") if parts.get(name)
    }
    tls = connection.tls is not None
    client: redis.Redis = group.master_for(  # type: ignore[no-untyped-call]
        connection.master,
        connection_class=PrimarySSLConnection if tls else PrimaryConnection,
        health_check_interval=30,
        **primary,
        **connection.redis_kwargs(),
        **retry,
    )
    return client


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
    #: Writes others rely on are confirmed by replicas (REDIS_MIN_REPLICAS_ACK; off: 0).
    replicas: ReplicaAck = OFF
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

    def confirm_writes(self) -> None:
        """Before a task ends (its message goes): everything written so far is held by the
        replicas asked for; NotReplicated (a ConnectionError) if not in time."""
        self.replicas.confirm(self.redis)

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
    replicas = replica_ack(settings)
    jobs = JobStore(
        client,
        secrets=purpose.secrets_of(settings.CALLBACK_SECRET, settings.CALLBACK_SECRET_PREVIOUS),
        replicas=replicas,
    )
    return Runtime(
        settings=settings,
        redis=client,
        jobs=jobs,
        inbox=Inbox(client, replicas=replicas),
        limiter=RateLimiter(client),
        storage=storage,
        batches=BatchStore(client, jobs),
        line=DispatchLine(client),
        fetches=DispatchLine(client, prefix=FETCH_PREFIX),
        replicas=replicas,
    )


def replica_ack(settings: Settings) -> ReplicaAck:
    """REDIS_MIN_REPLICAS_ACK and REDIS_WAIT_TIMEOUT_MS as the stores take them."""
    return ReplicaAck(settings.REDIS_MIN_REPLICAS_ACK, settings.REDIS_WAIT_TIMEOUT_MS)


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
