"""The webhook's Redis call: a script on a connection each thread keeps (real redis-server)."""

from __future__ import annotations

import threading

import pytest
import redis

from worker.model.pinned import PinnedScript
from worker.model.replicas import NotReplicated, ReplicaAck

ECHO = "redis.call('INCR', KEYS[1]); return {ARGV[1], redis.call('GET', KEYS[1])}"


def _clients(client: redis.Redis, name: str) -> int:
    """Connections named ``name`` that Redis sees."""
    return sum(1 for c in client.client_list() if c.get("name") == name)


def test_it_answers_like_the_client_and_keeps_one_connection_per_thread(
    redis_db: redis.Redis, redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url, client_name="pinned-test")
    script = PinnedScript(client, ECHO)
    assert script(keys=["n"], args=["a"]) == [b"a", b"1"]
    assert script(keys=["n"], args=["b"]) == [b"b", b"2"]
    assert _clients(redis_db, "pinned-test") == 1

    answers: list[object] = []
    threads = [
        threading.Thread(target=lambda: answers.append(script(keys=["n"], args=["t"])))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(a[1] for a in answers) == [b"3", b"4", b"5"]  # type: ignore[index]
    # Threads that ended leave their connection behind, in the pool's hands.
    assert _clients(redis_db, "pinned-test") == 4
    client.close()


def test_a_restarted_redis_that_forgot_the_script_is_sent_the_text(
    redis_db: redis.Redis, redis_url: str
) -> None:
    script = PinnedScript(redis.Redis.from_url(redis_url), ECHO)
    assert script(keys=["n"], args=["a"]) == [b"a", b"1"]
    redis_db.script_flush()
    assert script(keys=["n"], args=["b"]) == [b"b", b"2"]
    assert redis_db.script_exists(script.sha) == [True]


def test_an_error_answer_is_raised_and_the_connection_stays_in_step(
    redis_db: redis.Redis, redis_url: str
) -> None:
    script = PinnedScript(redis.Redis.from_url(redis_url), ECHO)
    redis_db.set("n", "not a number")
    with pytest.raises(redis.ResponseError, match="not an integer"):
        script(keys=["n"], args=["a"])
    redis_db.delete("n")
    assert script(keys=["n"], args=["b"]) == [b"b", b"1"]


def test_a_lost_connection_fails_that_call_and_the_next_one_reconnects(
    redis_db: redis.Redis, redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url, client_name="pinned-kill")
    script = PinnedScript(client, ECHO)
    assert script(keys=["n"], args=["a"]) == [b"a", b"1"]
    (ours,) = [c["id"] for c in redis_db.client_list() if c.get("name") == "pinned-kill"]
    assert redis_db.client_kill_filter(_id=ours) == 1
    with pytest.raises(redis.ConnectionError):
        script(keys=["n"], args=["b"])
    assert script(keys=["n"], args=["c"]) == [b"c", b"2"]
    client.close()


def test_with_replicas_asked_for_a_write_none_confirmed_is_refused(
    redis_db: redis.Redis, redis_url: str
) -> None:
    # This server has no replica: WAIT answers 0 after its timeout.
    script = PinnedScript(
        redis.Redis.from_url(redis_url), ECHO, replicas=ReplicaAck(replicas=1, timeout_ms=50)
    )
    with pytest.raises(NotReplicated):
        script(keys=["n"], args=["a"])
    assert redis_db.get("n") == b"1"  # written, not confirmed: the caller answers 503
    with pytest.raises(NotReplicated):  # both answers were read: the next call is in step
        script(keys=["n"], args=["b"])
    assert redis_db.get("n") == b"2"
