"""Task messages between the broker's queue and a worker's "unacknowledged" record.

kombu's Redis transport takes a message off the queue with BRPOP and only then records it as
unacknowledged (a second round trip). If the connection dies in between (Redis restarts,
the worker is killed, or Redis exits before sending the BRPOP reply), the message is in
neither place: lost. Our workers take messages with BLMOVE instead, into an in-flight list
(``worker.queue.broker``), and remove them from it once recorded. The watchdog sweep puts back on
the queue whatever stayed in that list across two sweeps. It also moves messages sent with a
Celery ``priority`` (kombu keeps them in lists of their own) to the end of the queue.

A message in the list belongs to whoever takes it out of the list, and each side does so in
one atomic step: the sweep (``RECOVER``: out of the list, onto the queue) or the consumer
that took it (``CLAIM``: out of the list, into kombu's unacknowledged record). A live
consumer can leave a message there for a long time: kombu (5.7) holds a BLMOVE reply that
arrives while the channel has no prefetch credit until credit returns, and Celery takes
credit away whenever a countdown task starts, for as long as the running task takes. If the
sweep requeues such a message (another worker then runs it), the consumer's claim finds it
gone and drops the held reply instead of running the task a second time. We chose this over
heartbeats of what each consumer holds (more moving parts, and a busy worker would keep the
message from the pool for as long as its task runs) and over never issuing BLMOVE without
credit (credit is taken away while a BLMOVE waits in Redis, which we cannot call back).
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any

import redis

from worker.queue.nodes import CLAIMING_NODES, claims_key

#: The Celery queue our workers consume (and our tasks are routed to).
DEFAULT_QUEUE = "apsis"

#: Seen in the previous sweep, still in flight now: back on the queue (at the consuming end).
RECOVER = """
local items = redis.call('LRANGE', KEYS[1], 0, -1)
local restored = 0
local current = {}
for _, item in ipairs(items) do
  local digest = redis.sha1hex(item)
  if redis.call('SISMEMBER', KEYS[3], digest) == 1 then
    redis.call('LREM', KEYS[1], 1, item)
    redis.call('RPUSH', KEYS[2], item)
    restored = restored + 1
  else
    current[#current + 1] = digest
  end
end
redis.call('DEL', KEYS[3])
for _, digest in ipairs(current) do
  redis.call('SADD', KEYS[3], digest)
end
for i = 4, #KEYS do
  while redis.call('LMOVE', KEYS[i], KEYS[2], 'RIGHT', 'LEFT') do
    restored = restored + 1
  end
end
return restored
"""

#: The consumer's side: out of the in-flight list and into kombu's unacknowledged record
#: (index and message, as ``kombu.transport.redis.QoS.append`` writes them) in one step; or
#: nothing, if the sweep has put the message back on the queue already (0). With a node
#: (KEYS[4], KEYS[5], ARGV[5], ARGV[6]), the same step records which node took the tag and
#: when (``worker.queue.nodes``), so the tag goes back on the queue if that node is lost.
CLAIM = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then
  return 0
end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
if #KEYS == 5 then
  redis.call('ZADD', KEYS[4], ARGV[2], ARGV[3])
  redis.call('HSET', KEYS[5], ARGV[5], ARGV[6])
end
return 1
"""

#: kombu's lists for messages sent with a Celery ``priority`` (lower than the default's, as
#: Redis counts them); our workers read only the default list, where the sweep moves them.
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)


def celery_queue() -> str:
    """The queue's name: CELERY_QUEUE, else ``apsis``."""
    return os.environ.get("CELERY_QUEUE", DEFAULT_QUEUE)


def inflight_key(queue: str) -> str:
    """The list a message waits in between BLMOVE and its unacknowledged record."""
    return f"{queue}:inflight"


def recover(client: Any, queue: str) -> int:
    """Requeue messages still in flight since the previous call, and move messages sent with
    a priority to the queue our workers read; returns how many moved."""
    keys = [inflight_key(queue), queue, f"{inflight_key(queue)}:seen"]
    keys += [f"{queue}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS]
    restored: int = client.eval(RECOVER, len(keys), *keys)
    return restored


def claim(
    client: Any,
    inflight: str,
    item: bytes,
    *,
    unacked_index: str,
    unacked: str,
    delivery_tag: str,
    record: str,
    at: float,
    node: str | None = None,
    queue: str | None = None,
) -> bool:
    """Move a taken message (``item``, as BLMOVE returned it) from the in-flight list
    ``inflight`` into the unacknowledged record; False if the sweep requeued it first.

    ``node``: the live node taking it, recorded with the ``queue`` it goes back to if that
    node is lost (``worker.queue.nodes.restore_lost``)."""
    keys = [inflight, unacked_index, unacked]
    args: list[Any] = [item, repr(at), delivery_tag, record]
    if node is not None and queue is not None:
        keys += [claims_key(node), CLAIMING_NODES]
        args += [node, queue]
    claimed: int = _run(client, CLAIM, keys, args)
    return claimed == 1


@functools.cache
def _sha(script: str) -> str:
    # The name Redis gives the script (SCRIPT LOAD), not a security measure.
    return hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()


def _run(client: Any, script: str, keys: list[Any], args: list[Any]) -> Any:
    """EVALSHA, and EVAL only when Redis does not know the script (the claim runs for every
    task message: sending its text each time costs bytes and a SHA1 on the server)."""
    try:
        return client.evalsha(_sha(script), len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:
        return client.eval(script, len(keys), *keys, *args)
