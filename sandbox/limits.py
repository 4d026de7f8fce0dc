"""Per-account rate limits: at most N requests in any trailing window of P seconds."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping

Limit = tuple[int, float]


class RateLimiter:
    """A sliding-window log per (account, class); only admitted requests are logged."""

    def __init__(
        self,
        limits: Mapping[str, Limit | None],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self._limits: dict[str, Limit | None] = dict(limits)
        self._logs: dict[tuple[str, str], deque[float]] = {}
        self._clock = clock

    def limits(self) -> dict[str, Limit | None]:
        with self._lock:
            return dict(self._limits)

    def set_limit(self, request_class: str, limit: Limit | None) -> None:
        """Change one class's limit now; None lifts it."""
        with self._lock:
            self._limits[request_class] = limit

    def reset(self) -> None:
        with self._lock:
            self._logs.clear()

    def admit(self, account: str, request_class: str) -> float | None:
        """Log and admit a request (None), or return the seconds until one would be admitted."""
        with self._lock:
            limit = self._limits.get(request_class)
            if limit is None:
                return None
            count, window = limit
            now = self._clock()
            log = self._logs.setdefault((account, request_class), deque())
            while log and log[0] <= now - window:
                log.popleft()
            if len(log) >= count:
                return max(log[0] + window - now, 0.0) if log else window
            log.append(now)
            return None


def retry_after_header(seconds: float) -> str:
    """Retry-After takes whole seconds; round up so a client that obeys it is admitted."""
    return str(max(1, math.ceil(seconds)))
