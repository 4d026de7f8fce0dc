"""What the product needs of Redis, checked at start: the ACL user's commands and keys, the
server's settings, and a one-line account of a failure to connect (TLS, credentials).

The ACL line the README documents grants exactly what ``needed_access`` lists; a user with
less is refused at start with a line naming each refusal, instead of failing on the first
task that meets it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import redis
from redis.exceptions import AuthenticationError, NoPermissionError

#: The inbox stream and its consumer group (worker.model.inbox), as probed.
_INBOX = "apsis:inbox"
#: A key of each family the product writes under ``apsis:`` (jobs, lines, limits, tokens,
#: leases, batches, heartbeats, the in-flight lists): one probe covers the ``apsis*`` pattern.
_KEY = "apsis:job:acl-probe"

#: Asks Redis, for each command in ARGV (a JSON list of argument lists), whether this user
#: may run it, without running it (``redis.acl_check_cmd``, Redis 7); returns the refused.
_CHECK = """
local refused = {}
for i, argv in ipairs(cjson.decode(ARGV[1])) do
  if not redis.acl_check_cmd(unpack(argv)) then table.insert(refused, i) end
end
return refused
"""


def needed_access(queue: str, *, db: int = 0) -> list[tuple[str, ...]]:
    """Every command the product (and kombu, Celery's Redis transport, for it) runs, with a
    key or channel of each pattern it runs it on. ``queue``: CELERY_QUEUE."""
    heartbeat = f"/{db}.celeryev/worker.heartbeat"
    access: list[tuple[str, ...]] = [
        ("ping",),
        ("time",),
        ("multi",),
        ("exec",),
        ("discard",),
        ("watch", "unacked"),
        ("unwatch",),
        ("evalsha", "0" * 40, "1", _KEY),
        ("script", "load", "return 1"),
        ("script", "exists", "0" * 40),
        # Strings: tokens, locks, leases, counters.
        ("get", _KEY),
        ("set", _KEY, "1"),
        ("del", _KEY),
        ("exists", _KEY),
        ("expire", _KEY, "1"),
        ("pexpire", _KEY, "1"),
        ("pttl", _KEY),
        ("incr", _KEY),
        # Hashes: job and batch records, kombu's unacknowledged messages.
        *[(cmd, _KEY, "f") for cmd in ("hget", "hexists", "hdel", "hmget")],
        ("hset", _KEY, "f", "v"),
        ("hsetnx", _KEY, "f", "v"),
        ("hincrby", _KEY, "f", "1"),
        ("hgetall", _KEY),
        ("hlen", _KEY),
        # Lists: histories, batch items, the queue and its in-flight list.
        ("lpush", _KEY, "v"),
        ("rpush", _KEY, "v"),
        ("lrange", _KEY, "0", "-1"),
        ("lindex", _KEY, "0"),
        ("lrem", _KEY, "1", "v"),
        ("ltrim", _KEY, "0", "1"),
        ("llen", _KEY),
        # Sets and sorted sets: lines, indexes, kombu's bindings and unacked index.
        ("sadd", _KEY, "m"),
        ("srem", _KEY, "m"),
        ("smembers", _KEY),
        ("sismember", _KEY, "m"),
        ("zadd", _KEY, "1", "m"),
        ("zrem", _KEY, "m"),
        ("zcard", _KEY),
        ("zcount", _KEY, "0", "1"),
        ("zrange", _KEY, "0", "1"),
        ("zrangebyscore", _KEY, "0", "1"),
        ("zremrangebyscore", _KEY, "0", "1"),
        ("zscore", _KEY, "m"),
        ("zrank", _KEY, "m"),
        # The callback inbox and the events stream.
        ("xadd", _INBOX, "*", "f", "v"),
        ("xreadgroup", "GROUP", "g", "c", "STREAMS", _INBOX, ">"),
        ("xack", _INBOX, "g", "0-1"),
        ("xautoclaim", _INBOX, "g", "c", "0", "0-0"),
        ("xdel", _INBOX, "0-1"),
        ("xgroup", "create", _INBOX, "g", "0", "MKSTREAM"),
        ("xlen", _INBOX),
        ("xtrim", _INBOX, "MAXLEN", "1"),
        # The broker: our queue, its priority lists and in-flight list, kombu's records.
        ("blmove", queue, f"{queue}:inflight", "RIGHT", "LEFT", "0"),
        ("lmove", f"{queue}\x06\x163", queue, "RIGHT", "LEFT"),
        ("brpop", queue, "1"),
        ("rpop", queue),
        ("lpush", queue, "v"),
        ("sadd", f"_kombu.binding.{queue}", "m"),
        ("zadd", "_kombu.binding_deadlines", "1", "m"),
        ("hset", "unacked", "f", "v"),
        ("zadd", "unacked_index", "1", "m"),
        ("set", "unacked_mutex", "1", "NX", "EX", "1"),
        # Celery's worker heartbeats (sent even with task events off).
        ("publish", heartbeat, "v"),
        # Writes confirmed by replicas (REDIS_MIN_REPLICAS_ACK, worker.model.replicas).
        ("wait", "0", "0"),
    ]
    if db:
        access.insert(0, ("select", str(db)))
    return access


def refused_access(client: redis.Redis, queue: str) -> list[str]:
    """Each of ``needed_access`` this client's user may not run, as ``command key``; [] when
    all is granted. Runs nothing but the check itself (one EVAL)."""
    import json

    db = int(client.connection_pool.connection_kwargs.get("db") or 0)
    access = needed_access(queue, db=db)
    try:
        refused: list[int] = client.eval(_CHECK, 0, json.dumps(access))
    except NoPermissionError:
        return ["eval"]
    named = [" ".join(access[n - 1][:2]) for n in refused]
    return [name.replace("\x06\x16", "\\x06\\x16") for name in named]


def settings_warnings(client: redis.Redis) -> list[str]:
    """What in the server's settings puts jobs at risk (no AOF, an eviction policy), one
    line each; a line saying so when the user may not read them (INFO refused)."""
    try:
        persistence = client.info("persistence")
        memory = client.info("memory")
    except NoPermissionError:
        return ["cannot check Redis's settings (AOF, maxmemory-policy): INFO is refused"]
    warnings = []
    if not int(persistence.get("aof_enabled", 0)):
        warnings.append(
            "Redis runs without AOF (appendonly no): a Redis restart loses queued tasks, jobs"
            " and callbacks; set appendonly yes"
        )
    policy = memory.get("maxmemory_policy", "noeviction")
    if policy != "noeviction":
        warnings.append(
            f"Redis's maxmemory-policy is {policy}: when full it deletes jobs, leases and"
            " queued tasks; set maxmemory-policy noeviction"
        )
    return warnings


@dataclass(frozen=True)
class RedisFailure:
    """A failure to reach or use Redis, in one line; ``config``: the user's settings are the
    cause (TLS, credentials, permissions), so a start-up exits 2, not 1."""

    line: str
    config: bool


def explain(exc: redis.RedisError, where: str) -> RedisFailure:
    """One line for a Redis error: TLS, credentials and permissions said as such.

    ``where``: the server without credentials (``RedisConnection.where``).
    """
    if isinstance(exc, AuthenticationError) or "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
        return RedisFailure(
            f"Redis at {where} refused the credentials: set the ACL user and password in"
            " REDIS_URL (rediss://USER:PASSWORD@host:port/db)",
            True,
        )
    if isinstance(exc, NoPermissionError):
        return RedisFailure(
            f"the Redis user may not do all the product needs at {where}: {exc}; grant it the"
            " README's ACL SETUSER line",
            True,
        )
    cause = _ssl_cause(exc)
    if cause is not None:
        reason = getattr(cause, "reason", None) or str(cause)
        if isinstance(cause, ssl.SSLCertVerificationError):
            reason = f"certificate verify failed ({cause.verify_message})"
        hint = (
            "give the CA that signed Redis's certificate in REDIS_TLS_CA_FILE (or"
            " ssl_ca_certs in REDIS_URL)"
            if isinstance(cause, ssl.SSLCertVerificationError)
            else "is this port serving TLS, and does it accept this client certificate"
            " (REDIS_TLS_CERT_FILE, REDIS_TLS_KEY_FILE)?"
        )
        return RedisFailure(f"TLS with Redis at {where} failed: {reason}; {hint}", True)
    if where.startswith("redis://") and "closed by server" in str(exc):
        return RedisFailure(
            f"Redis at {where} closed the connection: if it serves TLS, use rediss://", True
        )
    return RedisFailure(f"cannot reach Redis at {where} ({type(exc).__name__})", False)


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
