"""A Lua script run on a connection the calling thread keeps: the webhook's one Redis call.

Through redis-py's client, a call checks a connection out of the pool and back in (a lock
each way, and a poll of the socket for stray data), then runs the command through its
wrappers: measured on this project's host, that costs about as much client CPU as the round
trip itself (script call 78 µs of CPU through the client, 43 µs on the connection). The
webhook makes exactly one such call per callback, so each of its threads takes one
connection from the client's pool, once, and sends on it directly.

What the client gave is kept: the connection class (TLS, ACL credentials, a Sentinel
primary that is asked for again on every reconnect), its health check, timeouts, and the
script's load on NOSCRIPT (a restarted Redis). A connection that fails is closed, so the
next call reconnects; the error reaches the caller as redis-py's own.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import redis
from redis.exceptions import NoScriptError, ReadOnlyError, ResponseError

from worker.model.replicas import OFF, ReplicaAck


class PinnedScript:
    """``script(keys=..., args=...)``: EVALSHA (EVAL when Redis does not know it) on this
    thread's own connection, with the replicas' WAIT in the same round trip when asked."""

    def __init__(self, client: redis.Redis, text: str, *, replicas: ReplicaAck = OFF) -> None:
        self._pool = client.connection_pool
        self._text = text
        # The client's own script object: its sha, the same as redis-py would send.
        self.sha: str = client.register_script(text).sha
        self.replicas = replicas
        self._local = threading.local()

    def _connection(self) -> Any:
        pid = os.getpid()
        if getattr(self._local, "pid", None) != pid:
            # Kept for the thread's life (a gunicorn worker's request thread): never released.
            # Taken again in a forked child (the forking thread's locals survive the fork;
            # the pool hands the child connections of its own).
            self._local.conn = self._pool.get_connection()
            self._local.pid = pid
        return self._local.conn

    def __call__(self, *, keys: list[Any], args: list[Any]) -> Any:
        answer = self._run("EVALSHA", self.sha, keys, args)
        if isinstance(answer, NoScriptError):
            # Redis restarted (or flushed its scripts): EVAL sends the text and caches it.
            answer = self._run("EVAL", self._text, keys, args)
        if isinstance(answer, ResponseError):
            raise answer
        return answer

    def _run(self, verb: str, script: str, keys: list[Any], args: list[Any]) -> Any:
        """The script's answer, or the error Redis answered with (returned, not raised)."""
        conn = self._connection()
        commands: list[tuple[Any, ...]] = [(verb, script, len(keys), *keys, *args)]
        if self.replicas:
            commands.append(("WAIT", self.replicas.replicas, self.replicas.timeout_ms))
        try:
            conn.send_packed_command(conn.pack_commands(commands))
            answers = [_reply(conn) for _ in commands]
        except BaseException:
            # Whatever broke (a timeout, a lost socket, an interrupt mid-read), the
            # connection may hold half an answer: close it; the next call reconnects.
            conn.disconnect()
            raise
        if isinstance(answers[0], ReadOnlyError):
            # A demoted primary (a managed failover behind one address): reconnect next time.
            conn.disconnect()
        elif len(answers) > 1 and not isinstance(answers[0], ResponseError):
            self.replicas.check(answers[1])
        return answers[0]


def _reply(conn: Any) -> Any:
    """One reply; an error reply is returned, so the replies after it are still read."""
    try:
        return conn.read_response()
    except ResponseError as exc:  # not a connection error: the socket is in step
        return exc
