"""Writes confirmed by a replica (Redis's WAIT) before anyone outside Redis relies on them.

Redis replicates asynchronously: a write the primary answered is lost if the primary dies
before a replica has it and that replica is promoted (a Sentinel or managed failover). Where
we tell someone else we have a write (the webhook's 2xx to APSIS, a task's end, which lets
its message go) or act on one outside Redis (a download under a job's lease), the write is
first confirmed by ``replicas`` replicas. The replication stream is in the primary's order,
so a confirmed write confirms every write the primary ran before it, whoever sent it.

WAIT counts what the *connection it runs on* wrote, so it runs in the same pipeline as the
write (``fold``), or after a write of its own (``confirm``): never on just any connection
of a pool.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

#: The key ``confirm`` writes (a timestamp) so that its WAIT covers everything before it.
CONFIRM_KEY = "apsis:replicated"


class NotReplicated(redis.ConnectionError):
    """Too few replicas confirmed a write in time: it may not survive a failover.

    A ``ConnectionError``, so every caller treats it as Redis being unavailable: the webhook
    answers 503 (APSIS sends the callback again), a task goes back on the queue, the inbox
    consumer leaves the callback pending. Each retried write is idempotent."""

    def __init__(self, acked: int, wanted: int, timeout_ms: int) -> None:
        super().__init__(f"{acked} of {wanted} replicas confirmed the write within {timeout_ms} ms")
        self.acked = acked
        self.wanted = wanted


@dataclass(frozen=True)
class ReplicaAck:
    """How many replicas must confirm a write (REDIS_MIN_REPLICAS_ACK) and how long to wait
    for them (REDIS_WAIT_TIMEOUT_MS). ``replicas`` 0: off, nothing is sent."""

    replicas: int = 0
    timeout_ms: int = 1000

    def __bool__(self) -> bool:
        return self.replicas > 0

    def fold(self, pipe: Any) -> None:
        """Add the WAIT to ``pipe``, after its writes (one round trip with them)."""
        if self:
            pipe.wait(self.replicas, self.timeout_ms)

    def check(self, acked: int) -> None:
        """Raise NotReplicated unless ``acked`` (WAIT's answer) is enough."""
        if self and int(acked) < self.replicas:
            raise NotReplicated(int(acked), self.replicas, self.timeout_ms)

    def run(self, client: redis.Redis, script: Any, *, keys: list[Any], args: list[Any]) -> Any:
        """Run a registered script and, when on, confirm it in the same round trip."""
        if not self:
            return script(keys=keys, args=args)
        pipe = client.pipeline(transaction=False)
        script(keys=keys, args=args, client=pipe)
        self.fold(pipe)
        answer, acked = pipe.execute()
        self.check(acked)
        return answer

    def confirm(self, client: redis.Redis) -> None:
        """Confirm every write the primary ran so far (this process's included): a write of
        our own, then WAIT on its connection."""
        if not self:
            return
        pipe = client.pipeline(transaction=False)
        pipe.set(CONFIRM_KEY, repr(time.time()))
        self.fold(pipe)
        _, acked = pipe.execute()
        self.check(acked)


#: Off: what the stores use unless given REDIS_MIN_REPLICAS_ACK.
OFF = ReplicaAck()
