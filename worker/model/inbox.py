"""The callback inbox: a Redis stream the webhook appends to and the pool reads as a group.

At-least-once: an entry stays pending with the consumer that read it until that consumer
acknowledges it, after the job's transition is durable; entries left pending by a consumer
that died are reclaimed by another after ``min_idle`` seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

from worker.model.pinned import PinnedScript
from worker.model.replicas import OFF, ReplicaAck

#: The stream's name and its consumer group's.
STREAM = "apsis:inbox"
GROUP = "apsis-workers"
#: Stream where finished jobs and batches are announced for other services.
EVENTS_STREAM = "apsis:events"
#: Approximate length the events stream is trimmed to (it is a notification feed, not a log).
EVENTS_MAXLEN = 100_000
#: Each inbox consumer's own heartbeat key (prefix + name) and its TTL, in seconds.
HEARTBEAT_PREFIX = "apsis:heartbeat:"
HEARTBEAT_TTL = 30
#: Sorted set of inbox consumers scored by their last heartbeat (unix seconds).
HEARTBEATS_KEY = "apsis:heartbeats"
#: Seconds an inbox consumer's heartbeat counts as alive.
HEARTBEAT_FRESH_SECONDS = 30.0


@dataclass(frozen=True)
class Callback:
    """One recorded callback: which job and attempt, APSIS's code and message."""

    entry_id: str
    job_id: str
    attempt: int
    code: int
    message: str
    received_at: float
    deliveries: int = 1


def _decode(entry_id: bytes | str, fields: dict[bytes, bytes]) -> Callback:
    data = {k.decode(): v.decode() for k, v in fields.items()}
    return Callback(
        entry_id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
        job_id=data.get("job_id", ""),
        attempt=int(data.get("attempt", "0") or 0),
        code=int(data.get("code", "0") or 0),
        message=data.get("message", ""),
        received_at=float(data.get("received_at", "0") or 0),
    )


# Everything the webhook asks of Redis for one callback, in one round trip (the webhook's
# throughput is mostly Redis round trips). KEYS: job, flood counter, stream. ARGV: attempt,
# code, message, received_at, flood limit, flood window (s), job id.
# Returns {outcome[, entry id]}: unknown | ignored (ended, or an older attempt) | duplicate
# (the job is already past what this callback reports) | flood | recorded.
_RECORD = """
local f = redis.call('HMGET', KEYS[1], 'state', 'attempt')
local state, attempt = f[1], f[2]
if not state then return {'unknown'} end
if state == 'done' or state == 'failed' or attempt ~= ARGV[1] then return {'ignored'} end
local code = tonumber(ARGV[2])
if code == 100 and state ~= 'queued' and state ~= 'requested' then return {'duplicate'} end
if code ~= 100 and state == 'ready' then return {'duplicate'} end
local seen = redis.call('INCR', KEYS[2])
if seen == 1 then redis.call('EXPIRE', KEYS[2], ARGV[6]) end
if seen > tonumber(ARGV[5]) then return {'flood'} end
local id = redis.call('XADD', KEYS[3], '*', 'job_id', ARGV[7], 'attempt', ARGV[1],
  'code', ARGV[2], 'message', ARGV[3], 'received_at', ARGV[4])
return {'recorded', id}
"""


class Inbox:
    """Append and consume recorded callbacks."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        stream: str = STREAM,
        group: str = GROUP,
        replicas: ReplicaAck = OFF,
    ) -> None:
        self._client = client
        self.stream = stream
        self.group = group
        self._group_ready = False
        # The webhook's one call per callback, on a connection each of its threads keeps;
        # confirmed by ``replicas`` replicas before record() returns (the webhook answers
        # 2xx only then).
        self._record = PinnedScript(client, _RECORD, replicas=replicas)

    def record(
        self,
        *,
        job_key: str,
        job_id: str,
        attempt: int,
        code: int,
        message: str,
        flood_limit: int,
        flood_window: int,
    ) -> tuple[str, str | None]:
        """Check the job and the flood limit and append the callback, atomically (and
        confirmed by the replicas asked for: NotReplicated, a ConnectionError, if not).

        Returns (outcome, entry id if recorded); see _RECORD for the outcomes.
        """
        answer: Any = self._record(
            keys=[job_key, f"apsis:flood:{job_id}", self.stream],
            args=[attempt, code, message, repr(time.time()), flood_limit, flood_window, job_id],
        )
        outcome = answer[0].decode() if isinstance(answer[0], bytes) else str(answer[0])
        entry = answer[1] if len(answer) > 1 else None
        return outcome, entry.decode() if isinstance(entry, bytes) else entry

    def append(self, *, job_id: str, attempt: int, code: int, message: str) -> str:
        """Record a callback durably; returns the entry id."""
        entry_id = self._client.xadd(
            self.stream,
            {
                "job_id": job_id,
                "attempt": attempt,
                "code": code,
                "message": message,
                "received_at": repr(time.time()),
            },
        )
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    def ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self._client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def read(self, consumer: str, *, count: int = 100, block_ms: int = 1000) -> list[Callback]:
        """New entries for this consumer, waiting up to ``block_ms`` for some."""
        self.ensure_group()
        try:
            answer: Any = self._client.xreadgroup(
                self.group, consumer, {self.stream: ">"}, count=count, block=block_ms
            )
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                # Redis lost the group (restarted without persistence): create it again.
                self._group_ready = False
                return []
            raise
        callbacks: list[Callback] = []
        for _stream, entries in answer or []:
            callbacks += [_decode(entry_id, fields) for entry_id, fields in entries if fields]
        return callbacks

    def reclaim(self, consumer: str, *, min_idle: float, count: int = 100) -> list[Callback]:
        """Take over entries another consumer read but did not acknowledge in ``min_idle`` s."""
        self.ensure_group()
        answer: Any = self._client.xautoclaim(
            self.stream, self.group, consumer, min_idle_time=int(min_idle * 1000), count=count
        )
        entries: list[Any] = answer[1] if answer else []
        return [_decode(entry_id, fields) for entry_id, fields in entries if fields]

    def ack(self, entry_id: str) -> None:
        """Acknowledge and delete: the job's history keeps what the callback did."""
        pipe = self._client.pipeline(transaction=True)
        pipe.xack(self.stream, self.group, entry_id)
        pipe.xdel(self.stream, entry_id)
        pipe.execute()

    def beat(self, consumer: str, now: float) -> None:
        """Say ``consumer`` is alive: its own key with a TTL, and its score in the index."""
        pipe = self._client.pipeline(transaction=False)
        pipe.set(HEARTBEAT_PREFIX + consumer, repr(now), ex=HEARTBEAT_TTL)
        pipe.zadd(HEARTBEATS_KEY, {consumer: now})
        # Consumers gone for an hour leave the index (its size stays the pool's size).
        pipe.zremrangebyscore(HEARTBEATS_KEY, "-inf", now - 3600)
        pipe.execute()

    def live_consumers(self, now: float) -> list[tuple[str, float]]:
        """Consumers with a heartbeat in the last HEARTBEAT_FRESH_SECONDS: (name, at)."""
        fresh: list[tuple[bytes, float]] = self._client.zrangebyscore(  # type: ignore[assignment]
            HEARTBEATS_KEY, now - HEARTBEAT_FRESH_SECONDS, "+inf", withscores=True
        )
        return [(name.decode(), at) for name, at in fresh]

    def live_consumer_count(self, now: float) -> int:
        return int(self._client.zcount(HEARTBEATS_KEY, now - HEARTBEAT_FRESH_SECONDS, "+inf"))

    def backlog(self) -> int:
        """Entries recorded and not yet acknowledged."""
        return int(self._client.xlen(self.stream))

    def announce(self, event: dict[str, str]) -> None:
        """Publish a completion event for other services (approximately trimmed)."""
        self._client.xadd(EVENTS_STREAM, event, maxlen=EVENTS_MAXLEN, approximate=True)  # type: ignore[arg-type]

    def forget_events_before(self, cutoff: float) -> int:
        """Delete the events announced before ``cutoff`` (unix seconds): retention deletes
        the jobs they name, so the feed must not keep naming them. Returns how many."""
        minid = f"{max(int(cutoff * 1000), 0)}-0"
        return int(self._client.xtrim(EVENTS_STREAM, minid=minid, approximate=False))
