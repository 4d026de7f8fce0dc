"""A per-job lease in Redis, kept alive by a heartbeat thread while a task works on the job.

A fetch can take minutes; the lease tells a redelivered copy of the task (or the watchdog)
that the job is being worked on by a live process, and expires quickly when that process dies.
"""

from __future__ import annotations

import threading
import uuid
from types import TracebackType

import redis

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

    def __init__(self, client: redis.Redis, job_id: str, *, prefix: str = "apsis") -> None:
        self._client = client
        self._key = f"{prefix}:lease:{job_id}"
        self._owner = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def __enter__(self) -> JobLease:
        if not self._client.set(self._key, self._owner, nx=True, ex=LEASE_SECONDS):
            remaining = int(self._client.pttl(self._key))
            raise LeaseBusy(max(remaining, 1000) / 1000)
        self._thread = threading.Thread(target=self._beat, name="apsis-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self._renew(keys=[self._key], args=[self._owner, LEASE_SECONDS * 1000])
            except redis.RedisError:
                pass  # the next beat tries again; the lease outlives one missed beat

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
