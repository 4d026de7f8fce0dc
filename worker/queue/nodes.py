"""Worker nodes' liveness, and the task messages a lost node had taken.

A task message a node took stays in kombu's unacknowledged record (``unacked`` and
``unacked_index``) until the node acknowledges it, or until kombu restores it after the
broker's visibility timeout (CELERY_VISIBILITY_TIMEOUT, hours: a long download must not be
handed out again while it runs). A node killed outright (SIGKILL, OOM, a lost host) would
leave its reserved messages there for that long: the task its child was running and the ones
waiting for a free child or for their countdown. Nothing else knows of an
``apsis.export_profile`` message: its job is created by that very task.

So each node's main process keeps a liveness key (``apsis:node:<node>``, NODE_TTL s, refreshed
every BEAT_EVERY s by a thread of its own that does nothing else, so a node busy with tasks or
a slow inbox still beats), and the claim (``worker.queue.inflight.CLAIM``) records in the same
step which node took each delivery tag (``apsis:claims:<node>``: tag scored by the claim time,
the same score as in ``unacked_index``). The watchdog sweep puts back on the queue the still
unacknowledged messages of every node whose key is gone (``restore_lost``), each in one
atomic step that also checks the node is still silent and the message still that node's claim:
a message acknowledged meanwhile is left alone, and one restored is never restored twice.

A node that was only slow keeps its messages unless it stayed silent for NODE_TTL s (a frozen
process, a host cut off from Redis). If it then wakes up, a restored task may run twice:
every task here is idempotent (job transitions are atomic and outputs are rewritten in
place; a fetch takes the job's lease), so that costs time, never a wrong result. A node
without a beating heartbeat (no inbox step, a plain kombu consumer) records no claims; its
messages come back after the visibility timeout, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from worker.telemetry import metrics

log = logging.getLogger("apsis.nodes")

#: Seconds a node's liveness key lives without a refresh: the silence after which its taken
#: messages go to other nodes (they do at the next sweep: NODE_TTL + WATCHDOG_INTERVAL at most).
NODE_TTL = 15.0
#: Seconds between two refreshes: a node may miss two in a row before it counts as lost.
BEAT_EVERY = 5.0
#: Seconds between two prunes of a node's own claim record (tags acknowledged since).
PRUNE_EVERY = 60.0
#: Tags of a lost node restored per round trip (a node holds its prefetch count of them).
RESTORE_BATCH = 100
#: Which nodes have a claim record, and the queue each consumes (field: node, value: queue).
CLAIMING_NODES = "apsis:claiming-nodes"
#: kombu's unacknowledged record (``kombu.transport.redis.Channel``'s defaults).
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"

#: One tag of a silent node: back on the queue if the node is still silent (else -1), the
#: message is still unacknowledged, and it is still this node's claim (same claim time in
#: ``unacked_index``, same record: not one kombu restored and another node took since);
#: else only dropped from the node's record (0). kombu's own restore, as one step.
#: KEYS: liveness key, claims, unacked, unacked_index, queue. ARGV: tag, record, payload.
RESTORE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return -1
end
local claimed_at = redis.call('ZSCORE', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if not claimed_at or redis.call('ZSCORE', KEYS[4], ARGV[1]) ~= claimed_at
    or redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then
  return 0
end
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('RPUSH', KEYS[5], ARGV[3])
return 1
"""

#: A node's own record, minus the tags no longer its unacknowledged claims; the node leaves
#: CLAIMING_NODES with its last tag (a claim adds both back in one step).
#: KEYS: claims, unacked_index, CLAIMING_NODES. ARGV: node.
PRUNE = """
local pruned = 0
local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #entries, 2 do
  if redis.call('ZSCORE', KEYS[2], entries[i]) ~= entries[i + 1] then
    redis.call('ZREM', KEYS[1], entries[i])
    pruned = pruned + 1
  end
end
if redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('HDEL', KEYS[3], ARGV[1])
end
return pruned
"""


def node_key(node: str) -> str:
    """The liveness key of ``node``: present while the node beats."""
    return f"apsis:node:{node}"


def claims_key(node: str) -> str:
    """The delivery tags ``node`` took and has not acknowledged (as far as it pruned)."""
    return f"apsis:claims:{node}"


def new_node_id() -> str:
    """Unique per process start: a restarted node (same host, maybe the same pid) is a new one."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


class NodeHeartbeat:
    """Keeps this node's liveness key, in a daemon thread of its own, until the process ends.

    It is never stopped while the process lives (a warm shutdown still runs tasks to their
    end, and their messages are still this node's), so the key lapses only when the process
    is gone or cannot reach Redis for NODE_TTL s.
    """

    def __init__(
        self,
        client: Callable[[], Any],
        *,
        node: str | None = None,
        ttl: float = NODE_TTL,
        every: float = BEAT_EVERY,
        prune_every: float = PRUNE_EVERY,
    ) -> None:
        self._client = client
        self.node = node or new_node_id()
        self._ttl_ms = int(ttl * 1000)
        self._every = every
        self._prune_every = prune_every
        self._pid = os.getpid()
        self._stop = threading.Event()
        self._beaten = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def beating(self) -> bool:
        """Whether this process's heartbeat has written the key (claims are recorded then)."""
        return self._beaten.is_set() and not self._stop.is_set() and os.getpid() == self._pid

    def beat(self) -> None:
        self._client().set(node_key(self.node), repr(time.time()), px=self._ttl_ms)
        self._beaten.set()

    def prune(self) -> int:
        """Drop tags this node no longer holds from its record; returns how many."""
        keys = [claims_key(self.node), UNACKED_INDEX, CLAIMING_NODES]
        pruned: int = self._client().eval(PRUNE, len(keys), *keys, self.node)
        return pruned

    def run(self) -> None:
        last_prune = time.monotonic()
        while True:
            try:
                self.beat()
                if time.monotonic() - last_prune >= self._prune_every:
                    last_prune = time.monotonic()
                    self.prune()
            except Exception as exc:  # Redis unreachable: beat again soon; the key may lapse
                log.warning(
                    "node heartbeat failed; retrying",
                    extra={"event": "node_heartbeat_failed", "reason": type(exc).__name__},
                )
            if self._stop.wait(self._every):
                return

    def start(self) -> NodeHeartbeat:
        """Start beating (the first beat within moments) and make this the node claims name."""
        _this_process["heartbeat"] = self
        self._thread = threading.Thread(target=self.run, name="apsis-node-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating (tests; a worker never does): the key lapses after NODE_TTL s."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


#: The heartbeat started in this process, if any (a forked child's copy does not beat).
_this_process: dict[str, NodeHeartbeat] = {}


def claiming_node() -> str | None:
    """The node id a claim in this process records, or None: no heartbeat beats here."""
    current = _this_process.get("heartbeat")
    return current.node if current is not None and current.beating else None


def restore_lost(client: Any) -> int:
    """Put the unacknowledged messages of every node whose liveness key is gone back on their
    queue; returns how many."""
    total = 0
    raw: dict[bytes, bytes] = client.hgetall(CLAIMING_NODES)
    for node_raw, queue_raw in raw.items():
        node, queue = bytes_to_str(node_raw), bytes_to_str(queue_raw)
        if client.exists(node_key(node)):
            continue
        restored = _restore_node(client, node, queue)
        if restored:
            total += restored
            metrics.messages_restored("node_lost", restored)
            log.warning(
                "task messages a lost worker node had taken are back on the queue",
                extra={
                    "event": "node_lost",
                    "count": restored,
                    "reason": f"node {node} silent for {NODE_TTL:g} s",
                },
            )
    return total


def _restore_node(client: Any, node: str, queue: str) -> int:
    """Requeue what ``node`` still holds, tag by tag, while it stays silent; how many."""
    keys = [node_key(node), claims_key(node), UNACKED, UNACKED_INDEX, queue]
    restored = 0
    while tags := client.zrange(claims_key(node), 0, RESTORE_BATCH - 1):
        for tag in tags:
            record = client.hget(UNACKED, tag)
            payload = _redelivered(record) if record is not None else None
            # No payload: an expected record of b"" never matches, so the tag is only dropped.
            expected = record if payload is not None else b""
            done: int = client.eval(RESTORE, len(keys), *keys, tag, expected, payload or b"")
            if done == -1:
                return restored  # it beats again: its messages stay its own
            restored += done
    # The record is empty now: the node leaves the list unless it claimed again meanwhile.
    client.eval(PRUNE, 3, claims_key(node), UNACKED_INDEX, CLAIMING_NODES, node)
    return restored


def _redelivered(record: bytes) -> str | None:
    """The message to requeue from an ``unacked`` record, flagged redelivered as kombu's own
    restore does; None for a record that is not kombu's (left to the visibility timeout)."""
    with contextlib.suppress(ValueError, TypeError, KeyError, IndexError):
        payload = loads(bytes_to_str(record))[0]
        payload["headers"]["redelivered"] = True
        payload["properties"]["delivery_info"]["redelivered"] = True
        return str(dumps(payload))
    return None
