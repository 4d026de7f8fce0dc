"""A per-job lease in Redis, kept alive by a heartbeat thread while a task works on the job.

A fetch can take minutes; the lease tells a redelivered copy of the task (or the watchdog)
that the job is being worked on by a live process, and expires quickly when that process dies.

With ``stall_after``, the heartbeat proves progress, not just life: the holder calls
``progress()`` as its step moves (bytes downloaded, parsed, uploaded), and a step that
reported nothing for ``stall_after`` seconds is no longer renewed. A step hung for good (a
storage call that never returns) then loses its lease like a dead process, and the job is
dispatched again.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from types import TracebackType

import redis

from worker.model.replicas import OFF, ReplicaAck

log = logging.getLogger("apsis.lease")

#: Seconds a lease lives without a heartbeat: how long a killed worker's job waits.
LEASE_SECONDS = 30
#: Seconds between two heartbeats.
HEARTBEAT_SECONDS = 10

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaseBusy(Exception):
    """Another live process holds the lease; ``retry_after`` is its remaining time in s."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"leased by another worker for {retry_after:.1f} s more")
        self.retry_after = retry_after


class JobLease:
    """``with JobLease(client, job_id):`` holds the job's lease or raises LeaseBusy."""

    def __init__(
        self,
        client: redis.Redis,
        job_id: str,
        *,
        prefix: str = "apsis",
        stall_after: float | None = None,
        replicas: ReplicaAck = OFF,
    ) -> None:
        self._client = client
        #: The lease is confirmed by this many replicas before the holder acts under it: a
        #: failover must not hand the job to a second fetch while this one downloads.
        self._replicas = replicas
        self._key = f"{prefix}:lease:{job_id}"
        self._job_id = job_id
        self._owner = uuid.uuid4().hex
        self._stall_after = stall_after
        self._last_progress = time.monotonic()
        #: True once a heartbeat found no progress within ``stall_after`` (and did not renew).
        self.stalled = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def __enter__(self) -> JobLease:
        pipe = self._client.pipeline(transaction=False)
        pipe.set(self._key, self._owner, nx=True, ex=LEASE_SECONDS)
        self._replicas.fold(pipe)
        taken, *acked = pipe.execute()
        if not taken:
            remaining = int(self._client.pttl(self._key))
            raise LeaseBusy(max(remaining, 1000) / 1000)
        if acked:
            try:
                self._replicas.check(acked[0])
            except redis.ConnectionError:
                self._release(keys=[self._key], args=[self._owner])
                raise
        self._thread = threading.Thread(target=self._beat, name="apsis-lease", daemon=True)
        self._thread.start()
        return self

    def progress(self) -> None:
        """The step moved on (call it often: it is cheap); see ``stall_after``."""
        self._last_progress = time.monotonic()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            self.beat_once(time.monotonic())

    def beat_once(self, now: float) -> bool:
        """One heartbeat at monotonic time ``now``: renew the lease, unless the step has
        stalled. True if renewed."""
        idle = now - self._last_progress
        if self._stall_after is not None and idle > self._stall_after:
            if not self.stalled:
                log.error(
                    "step stalled: no progress; its lease is left to lapse",
                    extra={"job_id": self._job_id, "event": "stalled", "seconds": round(idle, 1)},
                )
            self.stalled = True
            return False
        self.stalled = False
        try:
            return bool(self._renew(keys=[self._key], args=[self._owner, LEASE_SECONDS * 1000]))
        except redis.RedisError:
            return False  # the next beat tries again; the lease outlives one missed beat

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        try:
            self._release(keys=[self._key], args=[self._owner])
        except redis.RedisError:
            pass  # it expires by itself within LEASE_SECONDS

    def held_elsewhere(self) -> bool:
        return bool(self._client.exists(self._key))
