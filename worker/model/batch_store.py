"""A batch's record in Redis: its counts, its items' index, the items held as merged profiles.

The job model's side of a batch. A batch job's end is counted inside the job's transition
script (``jobs.py``); what remains here is reading a batch, and the bookkeeping a finished
job does for the batch it belongs to (which items it held as merged profiles, whether it was
the batch's last). Feeding, finalizing and summarising a batch are the flow's
(``worker.flow.batches``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import redis

from worker.errors import JobNotFound
from worker.model.jobs import ExportOptions, JobStore

log = logging.getLogger("apsis.batch")

#: The task that finalizes a batch (sent by name: the model knows nothing of Celery).
FINALIZE_TASK = "apsis.finalize_batch"
#: Sorted set of unfinished batches (running, cancelled with jobs out, or complete with the
#: finalize or the caller's chain still to do), scored by their last submitted item (or the
#: sweep's last look): the watchdog's safety net for a lost finalize.
RUNNING_KEY = "apsis:batches:running"


# KEYS: a batch. ARGV: a field, a value, 1 to keep a value already there. Sets the field only
# on a batch that exists (never a stray hash for a batch deleted meanwhile); returns its value.
_MARK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if ARGV[3] == '1' then redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
else redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return redis.call('HGET', KEYS[1], ARGV[1])
"""


def batch_key(batch_id: str) -> str:
    return f"apsis:batch:{batch_id}"


def items_key(batch_id: str) -> str:
    return f"apsis:batch:{batch_id}:items"


def index_key(batch_id: str) -> str:
    """Hash: export key -> the item's index in the batch."""
    return f"apsis:batch:{batch_id}:index"


def linked_key(batch_id: str) -> str:
    """Hash: item index -> the finished job that exported that key as a merged profile."""
    return f"apsis:batch:{batch_id}:linked"


def refused_key(batch_id: str) -> str:
    """Hash: item index -> why the item got no job (its job id was taken by another)."""
    return f"apsis:batch:{batch_id}:refused"


def job_id_for(batch_id: str, index: int) -> str:
    """Item jobs are ``<batch_id>.<n>``: a caller's job id (no dots) never takes that form."""
    return f"{batch_id}.{index}"


def _own_index(job_id: str) -> int | None:
    tail = job_id.rpartition(".")[2]
    return int(tail) if tail.isdigit() else None


@dataclass(frozen=True)
class Batch:
    batch_id: str
    state: str  # running, cancelled (no new requests), done, cancelled-done
    total: int
    submitted: int
    done: int
    failed: int
    created_at: float
    account: str
    options: ExportOptions
    reference: str | None
    max_in_flight: int
    manifest: str | None
    finished_at: float | None
    chain: dict[str, Any] | None
    #: Items not exported on their own: a finished job of the batch held them as merged.
    linked: int = 0
    #: The caller's chain was sent (after the batch was finalized).
    chain_sent: bool = False
    #: What the caller's chain is sent (kept so a re-run can send it, once finalized).
    result: dict[str, Any] | None = None

    @property
    def ended(self) -> int:
        return self.done + self.failed + self.linked

    @property
    def in_flight(self) -> int:
        return self.submitted - self.ended

    @property
    def waiting(self) -> int:
        return self.total - self.submitted if self.state == "running" else 0

    @property
    def is_final(self) -> bool:
        return self.finished_at is not None

    @property
    def complete(self) -> bool:
        """Every item has ended (a cancelled batch: every item it sent)."""
        if self.state == "running":
            return self.ended >= self.total
        return self.state == "cancelled" and self.ended >= self.submitted

    @property
    def needs_finalize(self) -> bool:
        """Complete but not finalized, or finalized with the caller's chain not yet sent (a
        batch finished before the chain's result was kept has its chain sent already)."""
        if self.is_final:
            return self.chain is not None and not self.chain_sent and self.result is not None
        return self.complete


def _batch(batch_id: str, raw: dict[bytes, bytes]) -> Batch:
    data = {k.decode(): v.decode() for k, v in raw.items()}
    return Batch(
        batch_id=batch_id,
        state=data["state"],
        total=int(data["total"]),
        submitted=int(data.get("submitted", 0)),
        done=int(data.get("done", 0)),
        failed=int(data.get("failed", 0)),
        created_at=float(data["created_at"]),
        account=data["account"],
        options=ExportOptions.from_json(json.loads(data["options"])),
        reference=data.get("reference") or None,
        max_in_flight=int(data["max_in_flight"]),
        manifest=data.get("manifest") or None,
        finished_at=float(data["finished_at"]) if data.get("finished_at") else None,
        chain=json.loads(data["chain"]) if data.get("chain") else None,
        linked=int(data.get("linked", 0)),
        chain_sent=data.get("chain_sent") == "1",
        result=json.loads(data["result"]) if data.get("result") else None,
    )


class BatchStore:
    """Batch records on one Redis client, beside the job store they count."""

    def __init__(self, client: redis.Redis, jobs: JobStore) -> None:
        self._client = client
        self._jobs = jobs

    def get(self, batch_id: str) -> Batch:
        raw: dict[bytes, bytes] = self._client.hgetall(batch_key(batch_id))  # type: ignore[assignment]
        if not raw:
            raise JobNotFound(f"no batch {batch_id}")
        return _batch(batch_id, raw)

    def exists(self, batch_id: str) -> bool:
        return bool(self._client.exists(batch_key(batch_id)))

    def is_cancelled(self, batch_id: str | None) -> bool:
        if not batch_id:
            return False
        state = self._client.hget(batch_key(batch_id), "state")
        return state is not None and state.decode() == "cancelled"  # type: ignore[union-attr]

    def running_ids(self, limit: int | None = None, *, newest_first: bool = False) -> list[str]:
        """Unfinished batches (running, or cancelled with jobs still out)."""
        end = -1 if limit is None else limit - 1
        raw: list[bytes] = self._client.zrange(  # type: ignore[assignment]
            RUNNING_KEY, 0, end, desc=newest_first
        )
        return [r.decode() for r in raw]

    def stale_ids(self, before: float, *, limit: int = 100) -> list[str]:
        """Unfinished batches no feeder has passed over since ``before``."""
        raw: list[bytes] = self._client.zrangebyscore(  # type: ignore[assignment]
            RUNNING_KEY, "-inf", before, start=0, num=limit
        )
        return [r.decode() for r in raw]

    def many(self, batch_ids: list[str]) -> list[Batch]:
        """The batches that still exist among ``batch_ids``, in one round trip."""
        pipe = self._client.pipeline(transaction=False)
        for batch_id in batch_ids:
            pipe.hgetall(batch_key(batch_id))
        found: list[dict[bytes, bytes]] = pipe.execute() if batch_ids else []
        return [_batch(b, raw) for b, raw in zip(batch_ids, found, strict=True) if raw]

    def seen_running(self, batch_id: str, at: float) -> None:
        """A feeder or the sweep passed over this unfinished batch at ``at``."""
        self._client.zadd(RUNNING_KEY, {batch_id: at}, xx=True)

    def forget_running(self, batch_id: str) -> None:
        self._client.zrem(RUNNING_KEY, batch_id)

    def complete_since(self, batch_id: str, now: float) -> float:
        """When the sweep first saw this batch waiting for its finalize (``now`` if this is
        the first time): a finalize under way is given WATCHDOG_STUCK_AFTER from there."""
        raw = self._client.eval(_MARK, 1, batch_key(batch_id), "complete_seen_at", repr(now), 1)
        return float(raw) if raw is not None else now

    def mark_rescued(self, batch_id: str, at: float) -> None:
        """The sweep dispatched this batch's finalize: its finalize counts the rescue."""
        self._client.eval(_MARK, 1, batch_key(batch_id), "rescued_at", repr(at), 0)

    def rescued(self, batch_id: str) -> bool:
        return bool(self._client.hexists(batch_key(batch_id), "rescued_at"))

    def mark_chain_sent(self, batch_id: str) -> None:
        """The caller's chain is on its way: nothing is left for any task to do."""
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(batch_key(batch_id), "chain_sent", "1")
        pipe.zrem(RUNNING_KEY, batch_id)
        pipe.execute()

    def last_job_ended(self, batch_id: str | None) -> bool:
        """After a batch job ended: True if it was the batch's last (finalize it now)."""
        if not batch_id or not self.exists(batch_id):
            return False
        return self.get(batch_id).complete

    # -- merged profiles that are items of the same batch --------------------------------

    def merged_links(
        self, batch_id: str | None, job_id: str, merged: list[str]
    ) -> dict[str, dict[str, Any]]:
        """For each merged key that is also an item of the job's batch: ``batch_item`` (its
        index) and, if that item's job exists, ``linked_job``. Empty outside batches."""
        if not batch_id or not merged:
            return {}
        found = self._client.hmget(index_key(batch_id), merged)
        own = _own_index(job_id)
        links: dict[str, dict[str, Any]] = {}
        for key, raw in zip(merged, found, strict=True):
            if raw is None or int(raw) == own:
                continue
            index = int(raw)
            entry: dict[str, Any] = {"batch_item": index}
            if (
                self._jobs.exists(job_id_for(batch_id, index))
                and self.refusal(batch_id, index) is None
            ):
                entry["linked_job"] = job_id_for(batch_id, index)
            links[key] = entry
        return links

    def mark_linked(
        self, batch_id: str | None, job_id: str, links: dict[str, dict[str, Any]]
    ) -> None:
        """After ``job_id`` is done: the items it holds as merged profiles need no job of
        their own (the first finished job to hold an item keeps it)."""
        if not batch_id:
            return
        for entry in links.values():
            self._client.hsetnx(linked_key(batch_id), str(entry["batch_item"]), job_id)

    def skip_if_linked(self, batch_id: str, index: int) -> bool:
        """Count item ``index`` as submitted and linked if a finished job already holds it."""
        if self._client.hget(linked_key(batch_id), str(index)) is None:
            return False
        if self._jobs.exists(job_id_for(batch_id, index)):
            return False
        pipe = self._client.pipeline(transaction=True)
        pipe.hincrby(batch_key(batch_id), "submitted", 1)
        pipe.hincrby(batch_key(batch_id), "linked", 1)
        pipe.execute()
        log.info("batch item linked to a merged profile", extra={"batch_id": batch_id})
        return True

    def is_linked(self, batch_id: str, index: int) -> bool:
        """Item ``index`` was counted as linked (no job of its own)."""
        return self._client.hget(
            linked_key(batch_id), str(index)
        ) is not None and not self._jobs.exists(job_id_for(batch_id, index))

    def refusal(self, batch_id: str, index: int) -> str | None:
        """Why item ``index`` got no job of its own, if it was refused."""
        raw = self._client.hget(refused_key(batch_id), str(index))
        return raw.decode() if raw is not None else None  # type: ignore[union-attr]
