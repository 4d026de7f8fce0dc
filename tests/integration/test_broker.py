"""Taking task messages from Redis so that a lost connection loses none (worker/queue/broker.py).

kombu alone takes a message with BRPOP and records it as unacknowledged afterwards; a Redis
restart or a killed worker between the two loses the message, and a failed acknowledgement
leaves a worker that no longer consumes. These tests run our transport against a real Redis
and real Celery workers.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import kombu
import pytest
import redis

from worker.cli.embedded import EmbeddedRedis
from worker.cli.stack import LocalStack, retrying
from worker.flow.runtime import redis_client
from worker.model.jobs import JobStore
from worker.queue import inflight

pytestmark = pytest.mark.integration

QUEUE = "broker-test"
#: Seconds both workers have to take a task after the last restart: the broker connection's
#: health check (worker/queue/app.py) finds a dead one within about 2 x 5 s + 1 s.
AFTER_RESTARTS_WITHIN = 45.0
TRANSPORT = "worker.queue.broker:Transport"


def _publish(conn: kombu.Connection, body: dict[str, Any], **options: Any) -> None:
    queue = kombu.Queue(QUEUE, routing_key=QUEUE)
    with conn.Producer() as producer:
        producer.publish(body, routing_key=QUEUE, declare=[queue], serializer="json", **options)


def _consume_one(conn: kombu.Connection) -> list[Any]:
    got: list[Any] = []
    queue = kombu.Queue(QUEUE, routing_key=QUEUE)
    with conn.Consumer(queue, callbacks=[lambda body, message: got.append(body)]):
        conn.drain_events(timeout=5)
    return got


def test_a_taken_message_stays_in_flight_until_it_is_recorded_as_unacknowledged(
    redis_db: redis.Redis, redis_url: str
) -> None:
    seen: list[tuple[Any, int, int]] = []
    with kombu.Connection(redis_url, transport=TRANSPORT) as conn:
        _publish(conn, {"n": 1})

        def on_message(body: Any, message: kombu.Message) -> None:
            # While the worker handles it: recorded as unacknowledged, and out of flight in the
            # same step (never in neither place, never in both).
            seen.append(
                (body, redis_db.llen(inflight.inflight_key(QUEUE)), redis_db.hlen("unacked"))
            )

        queue = kombu.Queue(QUEUE, routing_key=QUEUE)
        with conn.Consumer(queue, callbacks=[on_message], accept=["json"]):
            conn.drain_events(timeout=5)

        assert seen == [({"n": 1}, 0, 1)]
        # Delivered: out of the in-flight list, off the queue, unacknowledged until acked.
        assert redis_db.llen(inflight.inflight_key(QUEUE)) == 0
        assert redis_db.llen(QUEUE) == 0
        assert redis_db.hlen("unacked") == 1


def test_a_message_a_lost_connection_left_in_flight_goes_back_on_the_queue(
    redis_db: redis.Redis, redis_url: str
) -> None:
    with kombu.Connection(redis_url, transport=TRANSPORT) as conn:
        _publish(conn, {"n": 2})
        # A consumer took it (BLMOVE) and lost its connection before recording it.
        redis_db.lmove(QUEUE, inflight.inflight_key(QUEUE), "RIGHT", "LEFT")
        assert redis_db.llen(QUEUE) == 0

        # The first sweep only notes it (a live consumer would have recorded it by the next).
        assert inflight.recover(redis_db, QUEUE) == 0
        assert inflight.recover(redis_db, QUEUE) == 1
        assert redis_db.llen(inflight.inflight_key(QUEUE)) == 0

        assert _consume_one(conn) == [{"n": 2}]
        # Nothing left to recover: a message delivered between two sweeps is not requeued.
        assert inflight.recover(redis_db, QUEUE) == 0
        assert redis_db.llen(QUEUE) == 0


def test_a_message_sent_with_a_priority_is_moved_where_workers_take_it(
    redis_db: redis.Redis, redis_url: str
) -> None:
    # A caller's plain kombu (as Celery's send_task(..., priority=5) uses) files it apart.
    with kombu.Connection(redis_url) as plain:
        _publish(plain, {"n": 3}, priority=5)
    assert redis_db.llen(QUEUE) == 0
    assert inflight.recover(redis_db, QUEUE) == 1
    with kombu.Connection(redis_url, transport=TRANSPORT) as conn:
        assert _consume_one(conn) == [{"n": 3}]


def _drain_quietly(conn: kombu.Connection, timeout: float = 0.2) -> None:
    try:
        conn.drain_events(timeout=timeout)
    except TimeoutError:
        pass


def test_a_reply_held_without_prefetch_credit_is_not_run_again_after_the_sweep_requeued_it(
    redis_db: redis.Redis, redis_url: str
) -> None:
    """kombu 5.7 holds a BLMOVE reply that arrives while the channel has no prefetch credit
    (Celery lowers the prefetch count whenever a countdown task starts). Meanwhile the sweep
    requeues the message and another consumer runs it; when credit returns, the held reply
    must not deliver it a second time."""
    runs: dict[int, list[str]] = {}
    taken: list[kombu.Message] = []

    def consumer(name: str) -> Any:
        def on_message(body: Any, message: kombu.Message) -> None:
            runs.setdefault(body["n"], []).append(name)
            taken.append(message)
            if name == "other":
                message.ack()

        return on_message

    queue = kombu.Queue(QUEUE, routing_key=QUEUE)
    with (
        kombu.Connection(redis_url, transport=TRANSPORT) as holder_conn,
        kombu.Connection(redis_url, transport=TRANSPORT) as other_conn,
    ):
        _publish(holder_conn, {"n": 1})
        holder = holder_conn.Consumer(queue, callbacks=[consumer("holder")], accept=["json"])
        holder.qos(prefetch_count=2)  # as Celery raises it while a countdown task waits
        with holder:
            _drain_quietly(holder_conn)  # takes message 1; keeps it unacknowledged
            _drain_quietly(holder_conn)  # with credit left: a BLMOVE now waits in Redis
            holder.qos(prefetch_count=1)  # the countdown task starts: credit gone
            _publish(other_conn, {"n": 2})  # the waiting BLMOVE takes it; kombu holds it
            _drain_quietly(holder_conn)
            assert runs == {1: ["holder"]}
            assert redis_db.llen(inflight.inflight_key(QUEUE)) == 1

            # Two sweeps: still in flight, so back on the queue; another consumer runs it.
            inflight.recover(redis_db, QUEUE)
            assert inflight.recover(redis_db, QUEUE) == 1
            with other_conn.Consumer(queue, callbacks=[consumer("other")], accept=["json"]):
                _drain_quietly(other_conn, timeout=5)
            assert runs[2] == ["other"]

            # Message 1 done: credit returns, and the held reply is read.
            taken[0].ack()
            for _ in range(3):
                _drain_quietly(holder_conn)

    duplicates = sum(len(names) - 1 for names in runs.values())
    print(f"duplicate task runs: {duplicates}")
    assert runs == {1: ["holder"], 2: ["other"]}
    assert redis_db.llen(QUEUE) == 0
    assert redis_db.llen(inflight.inflight_key(QUEUE)) == 0


@pytest.mark.timeout(300)
def test_workers_keep_taking_tasks_through_redis_restarts(tmp_path: Path) -> None:
    """Three Redis restarts while two workers run 200 exports: every job is recorded, and
    both workers still take tasks afterwards (neither is left connected to nothing)."""
    stack = LocalStack(
        redis_url="",
        redis_appendonly=True,
        storage_url=f"file://{tmp_path}/exports",
        workers=2,
        concurrency=2,
        env={
            "WATCHDOG_INTERVAL": "1",
            "CELERY_VISIBILITY_TIMEOUT": "30",
            "DOWNLOAD_TIMEOUT": "20",
            "LOG_LEVEL": "INFO",
        },
        log_dir=tmp_path,
    )
    try:
        stack.start()
        client = redis.Redis.from_url(stack.redis_url, socket_timeout=5)

        def submit(wave: str, count: int) -> list[str]:
            ids = [f"{wave}{n:05d}".ljust(32, "0") for n in range(count)]
            for job_id in ids:
                retrying(lambda j=job_id: stack.submit(f"{j}@example.com", job_id=j))
            return ids

        first = submit("a", 200)

        for _ in range(3):
            time.sleep(1.5)
            stack.restart_redis(down_for=1.0)
        # After the restarts, a trickle of exports until both workers have taken one (each
        # must notice its lost connection and reconnect: within the broker's health check).
        second: list[str] = []
        deadline = time.monotonic() + AFTER_RESTARTS_WITHIN
        while time.monotonic() < deadline:
            second += submit(f"b{len(second):03d}", 1)
            time.sleep(0.25)
            if all(_took(tmp_path, n) & set(second) for n in (1, 2)):
                break
        for n in (1, 2):
            assert _took(tmp_path, n) & set(second), f"worker {n} took no task after the restarts"

        jobs = JobStore(client)
        deadline = time.monotonic() + 150
        missing = first + second
        while missing and time.monotonic() < deadline:
            missing = [j for j in missing if retrying(lambda j=j: jobs.find(j)) is None]
            time.sleep(0.5)
        assert not missing, f"{len(missing)} jobs never recorded, e.g. {missing[:3]}"
    finally:
        stack.stop()


def _took(logs: Path, worker: int) -> set[str]:
    """The jobs worker number ``worker`` of a LocalStack recorded, from its log."""
    lines = (logs / f"worker-{worker}.log").read_text().splitlines()
    return {
        record["job_id"]
        for record in map(_json_or_none, lines)
        if record and record.get("msg") == "job created"
    }


def _json_or_none(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def test_a_worker_redis_command_rides_out_a_restart_and_the_webhook_one_does_not() -> None:
    """Workers retry a command through a Redis restart (about 3 s); the webhook's client
    fails at once, so it can answer 503 and let APSIS retry."""
    server = EmbeddedRedis(url="", appendonly=True)
    server.start()
    try:
        worker_client = redis_client(server.url, ride_out=True)
        webhook_client = redis_client(server.url)
        worker_client.set("k", "before")
        webhook_client.get("k")
        server.kill(graceful=True)
        back = threading.Timer(1.0, server.start_again)
        back.start()
        with pytest.raises(redis.ConnectionError):
            webhook_client.get("k")
        assert worker_client.get("k") == b"before"
        back.join()
    finally:
        server.stop()
