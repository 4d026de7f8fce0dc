"""Celery on Redis without its two loss windows: a message in flight, a stuck consumer.

1. Taking a message (``Transport``). kombu takes a message with BRPOP and records it as
   unacknowledged in a second step; a connection lost in between loses the message (see
   ``worker.queue.inflight``). Our channel takes it with BLMOVE into an in-flight list instead and
   removes it from there once recorded; the watchdog requeues what a lost connection left.
   It reads one queue (ours: ``apsis``; a channel consuming more falls back to kombu's
   BRPOP); the sweep moves messages sent with a Celery priority there. A message leaves the
   in-flight list and becomes unacknowledged in one step (``ClaimingQoS``), so a reply kombu
   held while the worker had no prefetch credit, and the sweep meanwhile requeued, is dropped
   rather than run a second time (see ``worker.queue.inflight``).

2. Settling a message (``Channel.basic_ack``/``basic_reject``). A message whose ack or
   reject did not reach Redis no longer holds a prefetch slot, so the worker goes on taking
   tasks (and so notices the lost connection and reconnects) instead of stalling.

Both were found by our fault suite (a job missing after a Redis restart) and reproduced with
Redis restarts under load; tests/integration/test_broker.py keeps them fixed.

3. Through a Sentinel group (``SentinelTransport``, for ``sentinel://`` broker URLs): the same
   channel, its connections made by kombu's Sentinel channel, which asks the sentinels for
   the primary on every new connection; after a failover the consumer's lost connection
   makes Celery reconnect, to the new primary.
"""

from __future__ import annotations

import logging
from queue import Empty
from time import monotonic, time
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from worker.model.sentinel import PrimaryConnection, PrimarySSLConnection
from worker.queue import inflight, nodes
from worker.queue.inflight import inflight_key

log = logging.getLogger("apsis.broker")


#: kombu's Redis classes, typed loosely: the stubs leave out the private parts we extend.
_RedisChannel: Any = kombu_redis.Channel
_RedisTransport: Any = kombu_redis.Transport
_RedisQoS: Any = kombu_redis.QoS
_RedisSentinelChannel: Any = kombu_redis.SentinelChannel


class AlreadyRequeued(Exception):
    """The sweep put a taken message back on the queue before this consumer recorded it."""


class ClaimingQoS(_RedisQoS):  # type: ignore[misc]
    """kombu's Redis QoS; a message taken with BLMOVE is recorded as unacknowledged only if it
    is still in the in-flight list, and leaves the list in the same step."""

    def append(self, message: Any, delivery_tag: str) -> None:
        taken: tuple[str, bytes] | None = self.channel._taken
        if taken is None:
            super().append(message, delivery_tag)
            return
        self.channel._taken = None
        delivery = message.delivery_info
        record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        with self.channel.conn_or_acquire() as client:
            claimed = inflight.claim(
                client,
                taken[0],
                taken[1],
                unacked_index=self.unacked_index_key,
                unacked=self.unacked_key,
                delivery_tag=delivery_tag,
                record=record,
                at=time(),
                node=nodes.claiming_node(),
                queue=self.channel._blmove_queue,
            )
        if not claimed:
            raise AlreadyRequeued()
        kombu_virtual.QoS.append(self, message, delivery_tag)


class Channel(_RedisChannel):  # type: ignore[misc]
    """kombu's Redis channel, taking messages with BLMOVE into an in-flight list."""

    QoS = ClaimingQoS
    _blmove_queue: str | None = None
    #: The in-flight list and the message just taken, until ``ClaimingQoS`` records it.
    _taken: tuple[str, bytes] | None = None
    #: The pool and the client on it that publishes, claims and acknowledges.
    _sync_client: tuple[Any, Any] | None = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        # kombu builds a new redis-py client for every publish, claim and ack (about 50 us
        # each with redis-py 8). A client is only a handle on its connection pool, so one
        # per pool serves them all; a new pool (after a lost connection) gets a new one.
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        cached = self._sync_client
        if cached is None or cached[0] is not pool:
            cached = self._sync_client = (pool, super()._create_client())
        return cached[1]

    def _single_queue(self) -> bool:
        return len(self.active_queues) == 1 and not self.global_keyprefix

    def _brpop_start(self, timeout: float | None = None) -> None:
        if not self._single_queue():
            super()._brpop_start(timeout)
            return
        if timeout is None:
            timeout = self.brpop_timeout
        queue = self._queue_cycle.consume(1)[0]
        self._blmove_queue = queue
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        self.client.connection.send_command(
            "BLMOVE", queue, inflight_key(queue), "RIGHT", "LEFT", timeout or 0
        )

    def _brpop_read(self, **options: Any) -> bool:
        queue = self._blmove_queue
        if queue is None:
            return bool(super()._brpop_read(**options))
        try:
            try:
                item = self.client.parse_response(self.client.connection, "BLMOVE", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if item is None:
                raise Empty()
            self._queue_cycle.rotate(queue)
            # Delivery records the message as unacknowledged and takes it out of the list in
            # one step (ClaimingQoS), or finds the sweep requeued it: then it is not run here.
            self._taken = (inflight_key(queue), item)
            try:
                self.connection._deliver(loads(bytes_to_str(item)), queue)
            except AlreadyRequeued:
                log.info(
                    "a taken task message was requeued by the sweep; not run here",
                    extra={"event": "message_already_requeued"},
                )
                raise Empty() from None
            if self._taken is not None:  # a no_ack consumer: nothing recorded it
                with self.conn_or_acquire() as client:
                    client.lrem(inflight_key(queue), 1, item)
            return True
        finally:
            self._taken = None
            self._in_poll = None
            self._blmove_queue = None
            flush = getattr(self, "_flush_brpop_reauth", None)
            if flush is not None:
                flush()

    def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
        try:
            super().basic_ack(delivery_tag, multiple)
        except self.connection_errors:
            self._settle_locally(delivery_tag)
            raise

    def basic_reject(self, delivery_tag: str, requeue: bool = False) -> None:
        try:
            super().basic_reject(delivery_tag, requeue)
        except self.connection_errors:
            self._settle_locally(delivery_tag)
            raise

    def _settle_locally(self, delivery_tag: str) -> None:
        """Free the prefetch slot of a message Redis did not hear settled.

        Otherwise kombu keeps counting it: with every slot counted so, the consumer stops
        asking for messages, never reads its dead connection, never reconnects, and the node
        runs no task again while looking alive (celery#8030, #9054, #10302). Freed, the
        next take fails on the dead connection, and Celery reconnects as for any lost
        connection. The message itself stays in Redis's ``unacked`` set and is redelivered
        after the visibility timeout; every task here is idempotent.
        """
        log.warning(
            "broker unreachable while settling a task message; Redis redelivers it",
            extra={"event": "unsettled_message"},
        )
        kombu_virtual.QoS.ack(self.qos, delivery_tag)


class Transport(_RedisTransport):  # type: ignore[misc]
    """kombu's Redis transport with our channel; set as Celery's ``broker_transport``."""

    Channel = Channel


class SentinelChannel(Channel, _RedisSentinelChannel):  # type: ignore[misc]
    """Our channel (BLMOVE, claims, settling) on connections to the primary a Sentinel
    group names: kombu's Sentinel channel supplies the pool (``_get_pool``) and the
    Sentinel-managed connection classes (ours: they find the primary again on every
    reconnect, see ``worker.model.sentinel``), our channel everything else."""

    connection_class = PrimaryConnection
    connection_class_ssl = PrimarySSLConnection


class SentinelTransport(Transport):
    """Our transport through a Sentinel group (``sentinel://`` URLs, ``master_name``)."""

    default_port = 26379
    Channel = SentinelChannel
