"""A lost worker node's task messages go back on the queue (worker/queue/nodes.py).

Against a real Redis: the claim records which node took each message, in the same step; the
sweep's restore puts back only what a silent node still holds unacknowledged, once; a node
that beats, however busy, keeps its messages; each node prunes its own record.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import kombu
import pytest
import redis
from kombu.utils.json import dumps, loads

from worker.queue import inflight, nodes

pytestmark = pytest.mark.integration

QUEUE = "nodes-test"
TRANSPORT = "worker.queue.broker:Transport"
#: A short liveness key for these tests (the product's is nodes.NODE_TTL).
TTL = 1.0


def _publish(redis_url: str, body: dict[str, Any]) -> None:
    queue = kombu.Queue(QUEUE, routing_key=QUEUE)
    with kombu.Connection(redis_url) as conn, conn.Producer() as producer:
        producer.publish(body, routing_key=QUEUE, declare=[queue], serializer="json")


def _take(client: redis.Redis, redis_url: str, body: dict[str, Any], node: str | None) -> str:
    """Publish a message and take it as our consumer does (BLMOVE, then CLAIM by ``node``);
    returns its delivery tag."""
    _publish(redis_url, body)
    item = client.lmove(QUEUE, inflight.inflight_key(QUEUE), "RIGHT", "LEFT")
    assert isinstance(item, bytes)
    payload = loads(item)
    tag: str = payload["properties"]["delivery_tag"]
    claimed = inflight.claim(
        client,
        inflight.inflight_key(QUEUE),
        item,
        unacked_index=nodes.UNACKED_INDEX,
        unacked=nodes.UNACKED,
        delivery_tag=tag,
        record=dumps([payload, QUEUE, QUEUE]),
        at=time.time(),
        node=node,
        queue=QUEUE,
    )
    assert claimed
    return tag


def _ack(client: redis.Redis, tag: str) -> None:
    """What kombu's ack does."""
    client.zrem(nodes.UNACKED_INDEX, tag)
    client.hdel(nodes.UNACKED, tag)


def _queued(client: redis.Redis) -> list[dict[str, Any]]:
    raws: list[bytes] = client.lrange(QUEUE, 0, -1)  # type: ignore[assignment]
    return [loads(raw) for raw in raws]


def _lapse(client: redis.Redis, node: str) -> None:
    """The node goes silent: its liveness key lapses (as TTL s after its last beat)."""
    client.delete(nodes.node_key(node))


@pytest.fixture
def heartbeat(redis_db: redis.Redis) -> Iterator[nodes.NodeHeartbeat]:
    beat = nodes.NodeHeartbeat(lambda: redis_db, ttl=TTL, every=TTL / 5, prune_every=0.0)
    beat.start()
    deadline = time.monotonic() + 10
    while not beat.beating:
        assert time.monotonic() < deadline, "the heartbeat never beat"
        time.sleep(0.01)
    yield beat
    beat.stop()


def test_a_lost_nodes_unacknowledged_message_goes_back_on_the_queue_once(
    redis_db: redis.Redis, redis_url: str
) -> None:
    acked = _take(redis_db, redis_url, {"n": 1}, "lost")
    held = _take(redis_db, redis_url, {"n": 2}, "lost")
    _ack(redis_db, acked)
    assert redis_db.zcard(nodes.claims_key("lost")) == 2  # the claim recorded both

    # Never beat, or stopped beating: its liveness key is gone.
    assert nodes.restore_lost(redis_db) == 1
    (restored,) = _queued(redis_db)
    assert restored["properties"]["delivery_tag"] == held
    assert restored["properties"]["delivery_info"]["redelivered"] is True
    assert redis_db.hlen(nodes.UNACKED) == 0 and redis_db.zcard(nodes.UNACKED_INDEX) == 0
    # Its record is gone: a second sweep restores nothing.
    assert not redis_db.exists(nodes.claims_key("lost"))
    assert not redis_db.hexists(nodes.CLAIMING_NODES, "lost")
    assert nodes.restore_lost(redis_db) == 0
    assert len(_queued(redis_db)) == 1

    # The restored message is the original one: our consumer runs it.
    got: list[Any] = []
    queue = kombu.Queue(QUEUE, routing_key=QUEUE)
    with (
        kombu.Connection(redis_url, transport=TRANSPORT) as conn,
        conn.Consumer(queue, callbacks=[lambda body, message: got.append(body)]),
    ):
        conn.drain_events(timeout=5)
    assert got == [{"n": 2}]


def test_a_node_that_beats_keeps_its_messages_however_busy(
    redis_db: redis.Redis, redis_url: str, heartbeat: nodes.NodeHeartbeat
) -> None:
    _take(redis_db, redis_url, {"n": 1}, heartbeat.node)
    # This process busy for three liveness periods (a slow task, a GC pause): the heartbeat
    # has a thread of its own.
    until = time.monotonic() + 3 * TTL
    spins = 0
    while time.monotonic() < until:
        spins += 1
    assert nodes.restore_lost(redis_db) == 0
    assert redis_db.hlen(nodes.UNACKED) == 1 and redis_db.llen(QUEUE) == 0


def test_a_node_that_beats_again_mid_restore_keeps_the_rest(
    redis_db: redis.Redis, redis_url: str
) -> None:
    tags = [_take(redis_db, redis_url, {"n": n}, "back") for n in range(3)]
    # The restore script itself checks the key, tag by tag (not only the sweep's first look).
    redis_db.set(nodes.node_key("back"), "1")
    assert nodes._restore_node(redis_db, "back", QUEUE) == 0
    assert redis_db.hlen(nodes.UNACKED) == 3 and redis_db.llen(QUEUE) == 0
    assert redis_db.zcard(nodes.claims_key("back")) == len(tags)


def test_a_message_another_node_took_since_stays_with_that_node(
    redis_db: redis.Redis, redis_url: str
) -> None:
    tag = _take(redis_db, redis_url, {"n": 1}, "first")
    # kombu's visibility timeout restored it, and a live node took it again (same tag).
    record = redis_db.hget(nodes.UNACKED, tag)
    assert isinstance(record, bytes)
    _ack(redis_db, tag)
    redis_db.rpush(QUEUE, dumps(loads(record)[0]))
    item = redis_db.lmove(QUEUE, inflight.inflight_key(QUEUE), "RIGHT", "LEFT")
    assert isinstance(item, bytes)
    inflight.claim(
        redis_db,
        inflight.inflight_key(QUEUE),
        item,
        unacked_index=nodes.UNACKED_INDEX,
        unacked=nodes.UNACKED,
        delivery_tag=tag,
        record=record.decode(),
        at=time.time() + 1,
        node="second",
        queue=QUEUE,
    )
    redis_db.set(nodes.node_key("second"), "1")

    # "first" is lost: the tag in its record is now "second"'s claim, not its own.
    assert nodes.restore_lost(redis_db) == 0
    assert redis_db.hexists(nodes.UNACKED, tag) and redis_db.llen(QUEUE) == 0
    assert not redis_db.hexists(nodes.CLAIMING_NODES, "first")
    assert redis_db.zcard(nodes.claims_key("second")) == 1


def test_a_consumer_records_its_claims_only_while_its_node_beats(
    redis_db: redis.Redis, redis_url: str
) -> None:
    queue = kombu.Queue(QUEUE, routing_key=QUEUE)

    def claims_while_handling() -> dict[bytes, bytes]:
        """The claim record while our consumer handles a message (closing restores it)."""
        seen: list[dict[bytes, bytes]] = []

        def on_message(body: Any, message: kombu.Message) -> None:
            tag = message.delivery_tag
            assert tag is not None
            claimed: dict[bytes, bytes] = redis_db.hgetall(nodes.CLAIMING_NODES)  # type: ignore[assignment]
            for node in claimed:
                # Recorded with the very claim time of kombu's unacknowledged index.
                at = redis_db.zscore(nodes.claims_key(node.decode()), tag)
                assert at is not None and at == redis_db.zscore(nodes.UNACKED_INDEX, tag)
            seen.append(claimed)

        _publish(redis_url, {"n": 1})
        with (
            kombu.Connection(redis_url, transport=TRANSPORT) as conn,
            conn.Consumer(queue, callbacks=[on_message], accept=["json"]),
        ):
            conn.drain_events(timeout=5)
        redis_db.delete(QUEUE)
        return seen[0]

    # No heartbeat in this process (a plain kombu consumer): nothing recorded, as before.
    assert claims_while_handling() == {}

    beat = nodes.NodeHeartbeat(lambda: redis_db, ttl=TTL, every=TTL / 5, prune_every=3600)
    beat.start()
    try:
        deadline = time.monotonic() + 10
        while not beat.beating:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert claims_while_handling() == {beat.node.encode(): QUEUE.encode()}
    finally:
        beat.stop()


def test_a_node_prunes_what_it_no_longer_holds_from_its_record(
    redis_db: redis.Redis, redis_url: str, heartbeat: nodes.NodeHeartbeat
) -> None:
    tags = [_take(redis_db, redis_url, {"n": n}, heartbeat.node) for n in range(3)]
    for tag in tags[:2]:
        _ack(redis_db, tag)
    assert heartbeat.prune() == 2
    assert redis_db.zrange(nodes.claims_key(heartbeat.node), 0, -1) == [tags[2].encode()]
    _ack(redis_db, tags[2])
    assert heartbeat.prune() == 1
    assert not redis_db.hexists(nodes.CLAIMING_NODES, heartbeat.node)
