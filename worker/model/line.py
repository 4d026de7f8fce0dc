"""The dispatch line: every export request of an account waits here for its slot.

One ordered line per APSIS account, in Redis, shared by the whole pool. A request is a job
id in one of three lanes: ``urgent`` (a caller asked for priority), ``single`` (a single
export, or a re-request of one) and ``batch`` (a re-request of a batch item; new batch
items are made by the dispatcher from the batch itself, so a batch of 50,000 is not 50,000
entries here). Within a lane, first in, first out. The dispatcher (``worker.flow.dispatch``)
takes the next request when a slot is free; a taken request stays on record until it was
sent, so a dispatcher that dies mid-send leaves nothing lost (``recover_taken``).

A request APSIS answered "not now" (429, 5xx) waits in ``later`` until its retry is due and
then goes back to the front of its lane, keeping its place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

LANES = ("urgent", "single", "batch")
PREFIX = "apsis:line"
#: Set of accounts with anything in their line (the dispatchers look here).
ACCOUNTS_KEY = f"{PREFIX}:accounts"


#: The download line: ready jobs waiting for a download slot (same lanes, same rules).
FETCH_PREFIX = "apsis:fetchline"


def lane_key(account: str, lane: str, prefix: str = PREFIX) -> str:
    return f"{prefix}:{account}:{lane}"


def later_key(account: str, prefix: str = PREFIX) -> str:
    """Requests waiting for a retry: job id -> the time it is due (unix seconds)."""
    return f"{prefix}:{account}:later"


def taken_key(account: str, prefix: str = PREFIX) -> str:
    """Requests a dispatcher took and has not sent yet: job id -> when it took it."""
    return f"{prefix}:{account}:taken"


def where_key(account: str, prefix: str = PREFIX) -> str:
    """Hash: job id -> "<lane>:<since>", its lane and when it joined the line (unix seconds,
    Redis's clock): its place, kept while it is in line."""
    return f"{prefix}:{account}:where"


# KEYS: the lane, where, accounts. ARGV: job id, lane, account. Adds the job at the back of
# its lane (scored by Redis's clock: first in, first out across every node) unless it is in
# line already (in any lane, later or taken): 0 if it was, 2 if added to an empty line (the
# account had nothing else in line), 1 if added behind others.
_ENQUEUE = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
local alone = redis.call('HLEN', KEYS[2]) == 0
local t = redis.call('TIME')
local since = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], since, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ':' .. string.format('%.6f', since))
redis.call('SADD', KEYS[3], ARGV[3])
if alone then return 2 end
return 1
"""

# KEYS: later, where, accounts. ARGV: job id, lane, account, due. A request out of line
# (a fetch that began, then was told "not now") waits in ``later`` until ``due``, then joins
# its lane with its place taken now; nothing if it is in line already.
_LATER = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
local t = redis.call('TIME')
local since = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ':' .. string.format('%.6f', since))
redis.call('ZADD', KEYS[1], tonumber(ARGV[4]), ARGV[1])
redis.call('SADD', KEYS[3], ARGV[3])
return 1
"""

# KEYS: the lane, taken. ARGV: now. Moves the lane's first job to taken: its id, or false.
_TAKE = """
local first = redis.call('ZRANGE', KEYS[1], 0, 0)
if #first == 0 then return false end
redis.call('ZREM', KEYS[1], first[1])
redis.call('ZADD', KEYS[2], ARGV[1], first[1])
return first[1]
"""

# KEYS: a holding set (later or taken), where, then the lanes in LANES order. ARGV: a
# score, a count. Moves up to ARGV[2] jobs scored at most ARGV[1] in the holding set back
# to their lane, at the place they joined it; returns their ids.
_BACK_TO_PLACE = """
local held = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local lanes = {urgent = KEYS[3], single = KEYS[4], batch = KEYS[5]}
for _, job in ipairs(held) do
  redis.call('ZREM', KEYS[1], job)
  local where = redis.call('HGET', KEYS[2], job)
  if where then
    local sep = string.find(where, ':')
    local lane = string.sub(where, 1, sep - 1)
    local since = tonumber(string.sub(where, sep + 1))
    redis.call('ZADD', lanes[lane] or KEYS[4], since, job)
  end
end
return held
"""


# KEYS: where, accounts. ARGV: the account. Takes the account off the set of accounts
# with work if nothing of it is in line.
_FORGET_IF_IDLE = """
if redis.call('HLEN', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[1]) end
return 0
"""


@dataclass(frozen=True)
class LaneCount:
    """One lane of one account's line: how many wait, and since when the first one does."""

    account: str
    lane: str
    waiting: int
    #: When the lane's first request joined the line (unix seconds); None: empty, or
    #: ``later`` (its requests are ordered by when their retry is due, not by arrival).
    oldest_since: float | None


@dataclass(frozen=True)
class Place:
    """Where a waiting request stands: its lane, how many wait ahead of it in the line."""

    lane: str
    ahead: int
    #: Waiting for a retry (APSIS said "not now") until this time, or None.
    retry_at: float | None = None


class DispatchLine:
    """The per-account lines on one Redis client: the request line (``PREFIX``), or the
    download line (``FETCH_PREFIX``)."""

    def __init__(self, client: redis.Redis, *, prefix: str = PREFIX) -> None:
        self._client = client
        self.prefix = prefix
        self._accounts_key = f"{prefix}:accounts"
        self._enqueue = client.register_script(_ENQUEUE)
        self._take = client.register_script(_TAKE)
        self._back = client.register_script(_BACK_TO_PLACE)
        self._forget = client.register_script(_FORGET_IF_IDLE)
        self._later_script = client.register_script(_LATER)

    def _lane(self, account: str, lane: str) -> str:
        return lane_key(account, lane, self.prefix)

    def _where(self, account: str) -> str:
        return where_key(account, self.prefix)

    def _taken(self, account: str) -> str:
        return taken_key(account, self.prefix)

    def _later(self, account: str) -> str:
        return later_key(account, self.prefix)

    def _lanes(self, account: str) -> list[str]:
        return [self._lane(account, lane) for lane in LANES]

    def enqueue(self, account: str, job_id: str, lane: str = "single") -> bool:
        """Put a request at the back of its lane; False if it is in line already."""
        return self.join(account, job_id, lane) != "present"

    def join(self, account: str, job_id: str, lane: str = "single") -> str:
        """Put a request at the back of its lane: "alone" if nothing else of the account is
        in line, "behind" if others are, "present" if it was in line already."""
        if lane not in LANES:
            raise ValueError(f"unknown lane {lane!r}")
        keys = [self._lane(account, lane), self._where(account), self._accounts_key]
        answer = int(self._enqueue(keys=keys, args=[job_id, lane, account]))
        return {0: "present", 1: "behind", 2: "alone"}[answer]

    def wait_until(self, account: str, job_id: str, lane: str, due: float) -> bool:
        """A request out of line waits until ``due``, then joins the back of its lane;
        False if it is in line already."""
        keys = [self._later(account), self._where(account), self._accounts_key]
        return bool(self._later_script(keys=keys, args=[job_id, lane, account, due]))

    def clear_ahead(self, account: str, lane: str, taken_below: int) -> bool:
        """Nothing waits in a lane ahead of ``lane`` and fewer than ``taken_below`` requests
        are taken and not yet sent: the next slot may go to ``lane`` at once."""
        pipe = self._client.pipeline(transaction=False)
        for other in LANES[: LANES.index(lane)]:
            pipe.zcard(self._lane(account, other))
        pipe.zcard(self._taken(account))
        *ahead, taken = pipe.execute()
        return not any(ahead) and int(taken) < taken_below

    def taken_count(self, account: str) -> int:
        """Requests taken and not yet sent (for downloads: dispatched, not yet begun)."""
        return int(self._client.zcard(self._taken(account)))

    def hold(self, account: str, job_id: str, lane: str, now: float | None = None) -> None:
        """Record a request the dispatcher made and sends now (a new batch item) as taken,
        so it comes back to its lane if the dispatcher dies before sending it."""
        now = time.time() if now is None else now
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(self._where(account), job_id, f"{lane}:{now:.6f}")
        pipe.zadd(self._taken(account), {job_id: now})
        pipe.sadd(self._accounts_key, account)
        pipe.execute()

    def accounts(self) -> list[str]:
        raw: set[bytes] = self._client.smembers(self._accounts_key)  # type: ignore[assignment]
        return sorted(a.decode() for a in raw)

    def waiting(self, account: str, lane: str) -> int:
        return int(self._client.zcard(self._lane(account, lane)))

    def lengths(self, account: str) -> dict[str, int]:
        """Requests waiting per lane, plus those waiting for a retry (``later``)."""
        pipe = self._client.pipeline(transaction=False)
        for lane in LANES:
            pipe.zcard(self._lane(account, lane))
        pipe.zcard(self._later(account))
        counts = pipe.execute()
        return {**dict(zip(LANES, map(int, counts), strict=False)), "later": int(counts[-1])}

    def summary(self) -> list[LaneCount]:
        """Every account's lanes (and ``later``): what the gauges and the status page show."""
        found = []
        for account in self.accounts():
            pipe = self._client.pipeline(transaction=False)
            for lane in LANES:
                pipe.zcard(self._lane(account, lane))
                pipe.zrange(self._lane(account, lane), 0, 0, withscores=True)
            pipe.zcard(self._later(account))
            answers = pipe.execute()
            for n, lane in enumerate(LANES):
                first = answers[2 * n + 1]
                since = float(first[0][1]) if first else None
                found.append(LaneCount(account, lane, int(answers[2 * n]), since))
            found.append(LaneCount(account, "later", int(answers[-1]), None))
        return found

    def take(self, account: str, lane: str, now: float | None = None) -> str | None:
        """The lane's first request, moved to ``taken``; None if the lane is empty."""
        now = time.time() if now is None else now
        raw = self._take(keys=[self._lane(account, lane), self._taken(account)], args=[now])
        return raw.decode() if raw else None

    def sent(self, account: str, job_id: str) -> None:
        """The request left (or the job ended): it is out of the line for good."""
        pipe = self._client.pipeline(transaction=True)
        pipe.zrem(self._taken(account), job_id)
        pipe.hdel(self._where(account), job_id)
        for key in self._lanes(account):
            pipe.zrem(key, job_id)
        pipe.zrem(self._later(account), job_id)
        pipe.execute()

    def retry_later(self, account: str, job_id: str, due: float) -> None:
        """APSIS said "not now": wait until ``due``, then go back to the same place."""
        pipe = self._client.pipeline(transaction=True)
        pipe.zrem(self._taken(account), job_id)
        pipe.zadd(self._later(account), {job_id: due})
        pipe.execute()

    def promote_due(self, account: str, now: float | None = None) -> int:
        now = time.time() if now is None else now
        keys = [self._later(account), self._where(account), *self._lanes(account)]
        moved: list[bytes] = self._back(keys=keys, args=[now, 1000])
        return len(moved)

    def next_retry_at(self, account: str) -> float | None:
        first: list[tuple[bytes, float]] = self._client.zrange(  # type: ignore[assignment]
            self._later(account), 0, 0, withscores=True
        )
        return first[0][1] if first else None

    def recover_taken(self, account: str, taken_before: float) -> list[str]:
        """Requests taken before ``taken_before`` and never sent (their dispatcher died):
        back at their place. Returns their ids."""
        keys = [self._taken(account), self._where(account), *self._lanes(account)]
        raw: list[bytes] = self._back(keys=keys, args=[taken_before, 1000])
        return [r.decode() for r in raw]

    def forget_account_if_idle(self, account: str) -> None:
        """Drop the account from self._accounts_key when nothing of it is in line (a new request
        adds it back). One script: a request placed between a look and the removal would
        otherwise wait in a line no feeder looks at."""
        self._forget(keys=[self._where(account), self._accounts_key], args=[account])

    def place(self, account: str, job_id: str) -> Place | None:
        """Where ``job_id`` waits, or None if it is not in line (sent, or never placed)."""
        raw = self._client.hget(self._where(account), job_id)
        if raw is None:
            return None
        lane, _, _since = raw.decode().partition(":")  # type: ignore[union-attr]
        retry_at = self._client.zscore(self._later(account), job_id)
        if retry_at is not None:
            return Place(lane=lane, ahead=0, retry_at=float(retry_at))
        rank = self._client.zrank(self._lane(account, lane), job_id)
        if rank is None:
            return Place(lane=lane, ahead=0)  # taken: being sent now
        ahead = int(rank)  # type: ignore[arg-type]
        for other in LANES[: LANES.index(lane)]:
            ahead += self.waiting(account, other)
        return Place(lane=lane, ahead=ahead)
