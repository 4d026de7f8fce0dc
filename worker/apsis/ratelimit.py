"""Pool-wide rate limits in Redis: GCRA in one Lua script, one bucket per account and class.

APSIS limits each account, however many workers ask, so the state lives in Redis and every
process of the pool draws from the same bucket. Redis's own clock (TIME) is the only clock,
so workers with skewed clocks still pace correctly.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from worker.telemetry import metrics

#: Fraction of the documented rate the pool keeps unused by default. APSIS counts requests
#: as they arrive, and arrival times jitter by tens of ms on a loaded host or a long network
#: path, so exact pacing earns an occasional 429. Measured with tests/integration/
#: test_batch_e2e.py (1,000 requests at 20/s from 4 processes on 2 cores): a 2% margin gave
#: a few 429s per run, 3% one now and then, 4% none at first but 1 or 2 in about half the
#: runs after the unit tests, 4.5% none in 3 such runs. At 1 request/s: one every 1.047 s.
#: APSIS_RATE_MARGIN overrides it.
DEFAULT_MARGIN = 0.045
RATE_SAFETY = 1 - DEFAULT_MARGIN

# KEYS[1] bucket; ARGV: emission interval (us), burst tolerance (us), max wait (us).
# Returns the wait in us: >= 0 a slot was reserved that far in the future (sleep, then go);
# < 0 nothing reserved, try again in -value us. The bucket expires when idle.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait < 0 then wait = 0 end
if wait > max_wait then
  return -(wait - max_wait)
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return wait
"""


@dataclass(frozen=True)
class Limit:
    """``count`` requests per ``period`` seconds, with ``burst`` allowed back to back."""

    count: float
    period: float
    burst: int = 1
    #: Fraction of the rate kept unused, against arrival jitter.
    margin: float = DEFAULT_MARGIN

    @property
    def interval(self) -> float:
        """Seconds between two requests at the paced rate (safety margin included)."""
        return self.period / (self.count * (1 - self.margin))


@dataclass(frozen=True)
class Slot:
    """The limiter's answer: go after ``wait`` seconds, or (not granted) ask again later."""

    granted: bool
    wait: float


class RateLimiter:
    """Shared GCRA buckets named ``apsis:rate:<account>:<class>``."""

    def __init__(self, client: redis.Redis, *, prefix: str = "apsis:rate") -> None:
        self._client = client
        self._prefix = prefix
        self._script = client.register_script(_GCRA)

    def acquire(self, account: str, kind: str, limit: Limit, *, max_wait: float) -> Slot:
        """Reserve a slot at most ``max_wait`` seconds away, or say when to ask again."""
        interval_us = int(limit.interval * 1_000_000)
        tolerance_us = interval_us * (limit.burst - 1)
        raw = self._script(
            keys=[f"{self._prefix}:{account}:{kind}"],
            args=[interval_us, tolerance_us, int(max_wait * 1_000_000)],
        )
        value = int(raw)
        slot = Slot(granted=value >= 0, wait=abs(value) / 1_000_000)
        metrics.rate_limit_answer(kind, granted=slot.granted, wait=slot.wait)
        return slot
