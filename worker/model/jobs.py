"""The job record and its state machine, in Redis, changed only by atomic transitions.

One hash per job (``apsis:job:<id>``), its history in a list beside it, a sorted set of jobs
waiting for APSIS (scored by callback deadline) and a hash of counts per state. Every change
goes through one Lua script that checks the current state (and attempt) first, so a
duplicate, late or out-of-order callback is a no-op, never a second download.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import redis

from worker.errors import BatchEnded, JobIdConflict, JobNotFound
from worker.model import purpose
from worker.model.replicas import OFF, ReplicaAck
from worker.telemetry import metrics


class State(StrEnum):
    QUEUED = "queued"  # recorded; the export request to APSIS is not sent yet
    REQUESTED = "requested"  # APSIS answered 202; waiting for its callbacks, no task running
    VERIFIED = "verified"  # APSIS's "callback verified" (code 100) arrived
    READY = "ready"  # the "ready" callback (code 200) arrived; the fetch task is dispatched
    DONE = "done"  # every object and the manifest are stored; the caller's chain resumed
    FAILED = "failed"  # ended with a reason


#: States in which a job waits for APSIS and holds no worker slot.
WAITING = (State.REQUESTED, State.VERIFIED)
#: States a job never leaves on its own.
FINAL = (State.DONE, State.FAILED)

#: Failed job ids kept, newest first, for the status page (a capped list).
RECENT_FAILURES = 100

#: Which states each state may be entered from.
ALLOWED_FROM: dict[State, tuple[State, ...]] = {
    State.REQUESTED: (State.QUEUED,),
    State.VERIFIED: (State.REQUESTED,),
    State.READY: (State.REQUESTED, State.VERIFIED),
    State.DONE: (State.READY,),
    State.FAILED: (State.QUEUED, State.REQUESTED, State.VERIFIED, State.READY),
    State.QUEUED: (State.REQUESTED, State.VERIFIED, State.READY, State.FAILED),
}

# KEYS: job, history, waiting zset, state counts, open zset, deadlines zset, finished zset.
# ARGV: to, allowed-from (comma list), expected attempt ('' = any), now, history entry,
#       waiting score ('' = leave the waiting set, 'keep' = as it is), attempt increment,
#       batch key prefix, then field/value pairs.
# Returns {applied (0/1), the state after the call}, plus the batch's state when a job
# leaving an end was refused because its batch has ended.
_TRANSITION = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {0, ''} end
local allowed = false
for s in string.gmatch(ARGV[2], '[^,]+') do
  if s == state then allowed = true end
end
if not allowed then return {0, state} end
if ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[3] then
  return {0, state}
end
-- Leaving an end (an operator's retry): the job's batch takes that end back in this same
-- step. A batch that has ended (every item ended: finalized or about to be) or was
-- cancelled is never reopened: refused, with the batch's state as the third value.
local reopens = (state == 'done' or state == 'failed')
  and ARGV[1] ~= 'done' and ARGV[1] ~= 'failed'
local job_batch = redis.call('HGET', KEYS[1], 'batch_id')
local jbk = nil
if job_batch and job_batch ~= '' then jbk = ARGV[8] .. job_batch end
if reopens and jbk then
  local b = redis.call('HMGET', jbk, 'state', 'finished_at', 'total', 'done', 'failed', 'linked')
  local ended = tonumber(b[4] or '0') + tonumber(b[5] or '0') + tonumber(b[6] or '0')
  if b[1] ~= 'running' or (b[2] and b[2] ~= '') or ended >= tonumber(b[3] or '0') then
    return {0, state, b[1] or 'deleted'}
  end
end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated_at', ARGV[4])
for i = 9, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
if tonumber(ARGV[7]) > 0 then redis.call('HINCRBY', KEYS[1], 'attempt', ARGV[7]) end
redis.call('RPUSH', KEYS[2], ARGV[5])
if ARGV[6] == '' then
  redis.call('ZREM', KEYS[3], KEYS[1])
elseif ARGV[6] ~= 'keep' then
  redis.call('ZADD', KEYS[3], ARGV[6], KEYS[1])
end
redis.call('HINCRBY', KEYS[4], state, -1)
redis.call('HINCRBY', KEYS[4], ARGV[1], 1)
-- 'open': jobs that some task should be moving along (not waiting for APSIS, not ended,
-- or done with the caller's chain not yet resumed), scored by their last change.
if ARGV[1] == 'queued' or ARGV[1] == 'ready' or ARGV[1] == 'done' then
  redis.call('ZADD', KEYS[5], ARGV[4], KEYS[1])
else
  redis.call('ZREM', KEYS[5], KEYS[1])
end
if ARGV[1] == 'done' or ARGV[1] == 'failed' then
  redis.call('ZREM', KEYS[6], KEYS[1])
  -- Finished jobs by end time: the retention sweep's index.
  redis.call('ZADD', KEYS[7], ARGV[4], KEYS[1])
  -- A batch counts its jobs' ends in the same step, so each end is counted exactly once.
  -- (The batch key is derived here: single-node Redis, not Redis Cluster.)
  local batch = redis.call('HGET', KEYS[1], 'batch_id')
  if batch and batch ~= '' then
    local bk = ARGV[8] .. batch
    redis.call('HINCRBY', bk, ARGV[1], 1)
    redis.call('HINCRBY', bk, 'in_flight', -1)
  end
elseif ARGV[1] == 'queued' then
  redis.call('ZADD', KEYS[6], redis.call('HGET', KEYS[1], 'deadline'), KEYS[1])
  redis.call('ZREM', KEYS[7], KEYS[1])
end
if reopens and jbk then
  redis.call('HINCRBY', jbk, state, -1)
  redis.call('HINCRBY', jbk, 'in_flight', 1)
end
return {1, ARGV[1]}
"""

# KEYS: job, history, state counts, open zset, deadlines zset, [batch]. ARGV: history, now,
# deadline, purpose digest (stored), the same under the previous secret ('' = none),
# export key, account, batch id ('' = none), then field/value pairs (the purpose among them).
# Creates the job unless it exists: returns 1 if created, 0 if it exists for the same
# purpose (an idempotent repeat), -1 if it exists for another purpose (refused).
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  local stored = redis.call('HGET', KEYS[1], 'purpose')
  if stored then
    if stored == ARGV[4] or (ARGV[5] ~= '' and stored == ARGV[5]) then return 0 end
    return -1
  end
  -- A record from before purposes were kept: compare what it holds.
  if redis.call('HGET', KEYS[1], 'export_key') ~= ARGV[6]
     or redis.call('HGET', KEYS[1], 'account') ~= ARGV[7]
     or (redis.call('HGET', KEYS[1], 'batch_id') or '') ~= ARGV[8] then
    return -1
  end
  return 0
end
for i = 9, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'queued', 1)
redis.call('ZADD', KEYS[4], ARGV[2], KEYS[1])
redis.call('ZADD', KEYS[5], ARGV[3], KEYS[1])
if KEYS[6] then
  redis.call('HINCRBY', KEYS[6], 'submitted', 1)
  redis.call('HINCRBY', KEYS[6], 'in_flight', 1)
end
return 1
"""


# KEYS: job, history, state counts, then every index zset (the last is the finished zset).
# Deletes an ended job atomically: a job restarted meanwhile is left alone.
_DELETE = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'done' and state ~= 'failed' then
  redis.call('ZREM', KEYS[#KEYS], KEYS[1])
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2])
for i = 4, #KEYS do redis.call('ZREM', KEYS[i], KEYS[1]) end
redis.call('HINCRBY', KEYS[3], state, -1)
return 1
"""


@dataclass(frozen=True)
class ExportOptions:
    """What to ask APSIS to include in the export."""

    include_attribute_history: bool = False
    include_type_definitions: bool = False
    include_merged_profiles: bool = True

    def to_json(self) -> dict[str, bool]:
        return {
            "include_attribute_history": self.include_attribute_history,
            "include_type_definitions": self.include_type_definitions,
            "include_merged_profiles": self.include_merged_profiles,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExportOptions:
        return cls(**{k: bool(v) for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Job:
    """A snapshot of one job record."""

    job_id: str
    state: State
    export_key: str
    account: str
    options: ExportOptions
    attempt: int
    created_at: float
    updated_at: float
    deadline: float
    reference: str | None = None
    batch_id: str | None = None
    download_url: str | None = None
    ready_entry: str | None = None
    error: str | None = None
    manifest: str | None = None
    manifest_sha256: str | None = None
    source_sha256: str | None = None
    source_bytes: int | None = None
    profiles: int | None = None
    chain: dict[str, Any] | None = None
    chain_dispatched: bool = False
    retries: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def is_final(self) -> bool:
        return self.state in FINAL


_KNOWN_FIELDS = {
    "job_id",
    "state",
    "export_key",
    "account",
    "options",
    "attempt",
    "created_at",
    "updated_at",
    "deadline",
    "reference",
    "batch_id",
    "download_url",
    "ready_entry",
    "error",
    "manifest",
    "manifest_sha256",
    "source_sha256",
    "source_bytes",
    "profiles",
    "chain",
    "chain_dispatched",
    "retries",
    "purpose",
}


def new_job_id() -> str:
    return uuid.uuid4().hex


def _job_from_hash(raw: Mapping[bytes, bytes]) -> Job:
    data = {k.decode(): v.decode() for k, v in raw.items()}

    def opt(name: str) -> str | None:
        value = data.get(name)
        return value if value not in (None, "") else None

    source_bytes, profiles = opt("source_bytes"), opt("profiles")
    chain = opt("chain")
    return Job(
        job_id=data["job_id"],
        state=State(data["state"]),
        export_key=data["export_key"],
        account=data["account"],
        options=ExportOptions.from_json(json.loads(data.get("options", "{}"))),
        attempt=int(data.get("attempt", "1")),
        created_at=float(data["created_at"]),
        updated_at=float(data.get("updated_at", data["created_at"])),
        deadline=float(data["deadline"]),
        reference=opt("reference"),
        batch_id=opt("batch_id"),
        download_url=opt("download_url"),
        ready_entry=opt("ready_entry"),
        error=opt("error"),
        manifest=opt("manifest"),
        manifest_sha256=opt("manifest_sha256"),
        source_sha256=opt("source_sha256"),
        source_bytes=int(source_bytes) if source_bytes else None,
        profiles=int(profiles) if profiles else None,
        chain=json.loads(chain) if chain else None,
        chain_dispatched=data.get("chain_dispatched") == "1",
        retries=int(data.get("retries", "0")),
        extra={k: v for k, v in data.items() if k not in _KNOWN_FIELDS},
    )


def _non_default(options: ExportOptions) -> dict[str, bool]:
    defaults = ExportOptions().to_json()
    return {k: v for k, v in options.to_json().items() if v != defaults[k]}


def _encode(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return "" if value is None else str(value)


class JobStore:
    """Reads and changes job records; the only code that writes them."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "apsis",
        secrets: tuple[str, ...] = (),
        replicas: ReplicaAck = OFF,
    ) -> None:
        self._client = client
        self._prefix = prefix
        #: Transitions are confirmed by this many replicas before they return (a creation
        #: by its task, with what else it wrote: ``Runtime.confirm_writes``).
        self.replicas = replicas
        #: Keys of the purpose digests, current first (CALLBACK_SECRET, then the previous).
        self.secrets = purpose.secrets_of(*secrets[:2])
        self._transition = client.register_script(_TRANSITION)
        self._create = client.register_script(_CREATE)
        self._delete = client.register_script(_DELETE)
        self.waiting_key = f"{prefix}:jobs:waiting"
        self.open_key = f"{prefix}:jobs:open"
        self.deadlines_key = f"{prefix}:jobs:deadlines"
        self.counts_key = f"{prefix}:jobs:counts"
        self.failures_key = f"{prefix}:jobs:recent_failures"
        self.finished_key = f"{prefix}:jobs:finished"

    def key(self, job_id: str) -> str:
        return f"{self._prefix}:job:{job_id}"

    def history_key(self, job_id: str) -> str:
        return f"{self._prefix}:job:{job_id}:history"

    def create(
        self,
        job_id: str,
        *,
        export_key: str,
        account: str,
        options: ExportOptions,
        deadline_seconds: float,
        reference: str | None = None,
        batch_id: str | None = None,
        chain: dict[str, Any] | None = None,
        now: float | None = None,
    ) -> bool:
        """Record a new job in state ``queued``; False (and no change) if the id exists for
        the same purpose (export key, options, account, batch).

        Raises JobIdConflict (and changes nothing) if the id exists for another purpose."""
        now = time.time() if now is None else now
        digests = purpose.job_digests(
            self.secrets,
            export_key=export_key,
            options=options.to_json(),
            account=account,
            batch_id=batch_id,
        )
        fields: dict[str, object] = {
            "job_id": job_id,
            "state": State.QUEUED.value,
            "export_key": export_key,
            "account": account,
            # Only the options that differ from the defaults (from_json fills in the rest):
            # keeps a waiting job's hash values under Redis's listpack limit (64 bytes), so
            # the hash stays compact: ~0.7 KB less Redis per waiting job (bench/).
            "options": _non_default(options),
            "attempt": 1,
            "created_at": now,
            "updated_at": now,
            "deadline": now + deadline_seconds,
            "reference": reference,
            "batch_id": batch_id,
            "chain": chain,
            "retries": 0,
            "purpose": digests[0],
        }
        args: list[str] = [
            _history(State.QUEUED, now, "created"),
            repr(now),
            repr(now + deadline_seconds),
            digests[0],
            digests[1] if len(digests) > 1 else "",
            export_key,
            account,
            batch_id or "",
        ]
        for name, value in fields.items():
            if value is not None:
                args += [name, _encode(value)]
        keys = [
            self.key(job_id),
            self.history_key(job_id),
            self.counts_key,
            self.open_key,
            self.deadlines_key,
        ]
        if batch_id:
            keys.append(f"{self._prefix}:batch:{batch_id}")
        created = int(self._create(keys=keys, args=args))
        if created < 0:
            raise JobIdConflict(
                f"job id {job_id} is already used for a different export "
                "(another key, options, account or batch); choose a new job id"
            )
        return created == 1

    def get(self, job_id: str) -> Job:
        raw = self._client.hgetall(self.key(job_id))
        if not raw:
            raise JobNotFound(f"no job {job_id}")
        return _job_from_hash(raw)  # type: ignore[arg-type]

    def find(self, job_id: str) -> Job | None:
        try:
            return self.get(job_id)
        except JobNotFound:
            return None

    def exists(self, job_id: str) -> bool:
        return bool(self._client.exists(self.key(job_id)))

    def history(self, job_id: str) -> list[dict[str, Any]]:
        entries = self._client.lrange(self.history_key(job_id), 0, -1)
        return [json.loads(entry) for entry in entries]

    def transition(
        self,
        job_id: str,
        to: State,
        *,
        note: str = "",
        attempt: int | None = None,
        waiting_until: float | None = None,
        keep_waiting: bool = False,
        new_attempt: bool = False,
        fields: Mapping[str, object] | None = None,
        allowed_from: Iterable[State] | None = None,
        now: float | None = None,
    ) -> tuple[bool, State | None]:
        """Move the job to ``to`` if its state allows it (and its attempt matches).

        Returns (applied, state after). Not applied means a no-op: the job was already
        past that point, or the call was for an older attempt.

        Leaving an end (``failed`` → ``queued``) takes the end back from the job's batch
        counts in the same step; raises BatchEnded (and changes nothing) if that batch has
        ended or was cancelled: a finished batch is never reopened.
        """
        now = time.time() if now is None else now
        sources = ALLOWED_FROM[to] if allowed_from is None else tuple(allowed_from)
        args: list[str] = [
            to.value,
            ",".join(s.value for s in sources),
            "" if attempt is None else str(attempt),
            repr(now),
            _history(to, now, note),
            "keep" if keep_waiting else "" if waiting_until is None else repr(waiting_until),
            "1" if new_attempt else "0",
            f"{self._prefix}:batch:",
        ]
        for name, value in (fields or {}).items():
            args += [name, _encode(value)]
        keys = [
            self.key(job_id),
            self.history_key(job_id),
            self.waiting_key,
            self.counts_key,
            self.open_key,
            self.deadlines_key,
            self.finished_key,
        ]
        applied, state, *refused = self.replicas.run(
            self._client, self._transition, keys=keys, args=args
        )
        if refused:
            raise BatchEnded(job_id, _text(refused[0]))
        if applied and to in FINAL:
            metrics.job_ended(to.value)
            if to == State.FAILED:
                # Not atomic with the transition: at worst a failure is missing from the
                # status page's list; the job record itself is exact.
                pipe = self._client.pipeline(transaction=True)
                pipe.lpush(self.failures_key, job_id)
                pipe.ltrim(self.failures_key, 0, RECENT_FAILURES - 1)
                pipe.execute()
        state_text = _text(state)
        return bool(applied), State(state_text) if state_text else None

    def update(self, job_id: str, fields: Mapping[str, object]) -> None:
        """Set fields that are not part of the state machine (progress, results)."""
        if fields:
            mapping: dict[str | bytes, str] = {k: _encode(v) for k, v in fields.items()}
            self._client.hset(self.key(job_id), mapping=mapping)  # type: ignore[arg-type]

    def count_retry(self, job_id: str) -> int:
        """Count one more retry on the job (the cap is the job's, not Celery's task id's)."""
        return int(self._client.hincrby(self.key(job_id), "retries", 1))

    def touch(self, job_id: str, now: float) -> None:
        """Record activity on an open job (the watchdog re-dispatched it)."""
        self._client.zadd(self.open_key, {self.key(job_id): now}, xx=True)

    def mark_chain_dispatched(self, job_id: str) -> None:
        """The caller's chain is on its way: nothing is left for any task to do."""
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(self.key(job_id), "chain_dispatched", "1")
        pipe.zrem(self.open_key, self.key(job_id))
        pipe.execute()

    def recent_failures(self, limit: int = 20) -> list[str]:
        """Ids of the jobs that failed last, newest first (at most RECENT_FAILURES kept)."""
        raw = self._client.lrange(self.failures_key, 0, limit - 1)
        return [v.decode() for v in raw]  # type: ignore[union-attr]

    def forget_failure(self, job_id: str) -> None:
        """A failed job was restarted: no longer one of the recent failures."""
        self._client.lrem(self.failures_key, 0, job_id)

    def counts(self) -> dict[str, int]:
        raw = self._client.hgetall(self.counts_key)
        return {k.decode(): int(v) for k, v in raw.items()}  # type: ignore[union-attr]

    def _ids_scored_below(self, zset: str, score: float, limit: int) -> list[str]:
        keys = self._client.zrangebyscore(zset, "-inf", score, start=0, num=limit)
        prefix = f"{self._prefix}:job:"
        return [k.decode().removeprefix(prefix) for k in keys]  # type: ignore[union-attr]

    def overdue(self, now: float | None = None, *, limit: int = 100) -> list[str]:
        """Job ids whose callback deadline has passed."""
        return self._ids_scored_below(self.waiting_key, time.time() if now is None else now, limit)

    def past_deadline(self, now: float | None = None, *, limit: int = 100) -> list[str]:
        """Unfinished job ids whose overall deadline has passed."""
        return self._ids_scored_below(
            self.deadlines_key, time.time() if now is None else now, limit
        )

    def idle_since(self, before: float, *, limit: int = 100) -> list[str]:
        """Open jobs (queued, ready, or done with the chain pending) unchanged since ``before``."""
        return self._ids_scored_below(self.open_key, before, limit)

    def finished_before(self, before: float, *, limit: int = 100) -> list[str]:
        """Ended jobs (done or failed) that ended before ``before`` (the retention sweep)."""
        return self._ids_scored_below(self.finished_key, before, limit)

    def delete(self, job_id: str) -> bool:
        """Remove an ended job's record and history, keeping the counts per state true.

        False (and no change, beyond forgetting a stale index entry) unless it has ended."""
        keys = [
            self.key(job_id),
            self.history_key(job_id),
            self.counts_key,
            self.waiting_key,
            self.open_key,
            self.deadlines_key,
            self.finished_key,
        ]
        return bool(self._delete(keys=keys))

    def nearest_deadlines(self, limit: int = 1) -> list[tuple[str, float]]:
        """Unfinished jobs with the nearest deadlines: (job id, deadline), nearest first."""
        found: list[tuple[bytes, float]] = self._client.zrange(  # type: ignore[assignment]
            self.deadlines_key, 0, limit - 1, withscores=True
        )
        prefix = f"{self._prefix}:job:"
        return [(k.decode().removeprefix(prefix), at) for k, at in found]

    def due_before(self, at: float) -> int:
        """How many unfinished jobs have a deadline before ``at`` (or past)."""
        return int(self._client.zcount(self.deadlines_key, "-inf", at))

    def oldest_waiting(self) -> float | None:
        """Creation time of the job that has waited for APSIS longest, if any."""
        # Every job waits the same APSIS_CALLBACK_TIMEOUT, so the earliest deadline is the
        # job that has waited longest.
        first: list[bytes] = self._client.zrange(self.waiting_key, 0, 0)  # type: ignore[assignment]
        if not first:
            return None
        created = self._client.hget(first[0].decode(), "created_at")
        return float(created) if created else None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _history(state: State, now: float, note: str) -> str:
    return json.dumps({"state": state.value, "at": round(now, 3), "note": note})
