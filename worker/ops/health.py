"""``apsis-export health``: a worker node's probe (Redis, storage, its inbox consumer alive)."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import redis

from worker.errors import ExportError
from worker.flow.runtime import Runtime
from worker.model.inbox import HEARTBEAT_FRESH_SECONDS
from worker.ops.redis_access import explain


@dataclass(frozen=True)
class Health:
    ok: bool
    line: str


def check_node(rt: Runtime, *, node: str | None = None, now: float | None = None) -> Health:
    """Redis answers, storage answers, and an inbox consumer of ``node`` (default: this
    host) sent a heartbeat in the last HEARTBEAT_FRESH_SECONDS. One line either way."""
    node = node or socket.gethostname()
    try:
        rt.redis.ping()
    except redis.RedisError as exc:
        failure = explain(exc, "REDIS_URL")
        # TLS, credentials and permissions said as such; otherwise just unreachable.
        line = failure.line if failure.config else f"redis unreachable ({type(exc).__name__})"
        return Health(False, f"unhealthy: {line}")
    try:
        rt.storage.check()
    except ExportError as exc:
        return Health(False, f"unhealthy: {exc}")
    now = time.time() if now is None else now
    # Consumer names are "<host>-<pid>" (worker.flow.consumer.consumer_name).
    fresh = rt.inbox.live_consumers(now)
    ours = [(name, at) for name, at in fresh if name.rpartition("-")[0] == node]
    if not ours:
        return Health(
            False,
            f"unhealthy: no inbox consumer heartbeat from {node} in the last "
            f"{HEARTBEAT_FRESH_SECONDS:g} s",
        )
    name, at = max(ours, key=lambda pair: pair[1])
    return Health(True, f"ok: redis, storage, inbox consumer {name} {max(now - at, 0):.0f} s ago")
