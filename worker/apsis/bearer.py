"""The APSIS bearer token, cached in Redis for the whole pool and renewed by one caller.

APSIS allows 10 token requests a minute per account, so N worker processes must share one
token: it is cached under ``apsis:token:<account>`` until its JWT ``exp``, renewed once a
fixed fraction of its lifetime remains, and only the holder of a short Redis lock fetches a
new one (single flight) while the others keep using the current token or wait briefly.
"""

from __future__ import annotations

import base64
import collections
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import redis

from worker.errors import ApsisAuthError, RetryableApsisError

#: Renew once this fraction of the token's lifetime remains (24 h token: 2.4 h before exp;
#: a 60 s token: 6 s before). Proportional, so short-lived tokens still get used.
RENEW_FRACTION = 0.1
#: Seconds the refresh lock is held at most (a token request times out well before).
LOCK_SECONDS = 30.0
#: Seconds a caller waits for another process's refresh before giving up.
WAIT_FOR_REFRESH = 20.0
#: Seconds between two looks at the cache while waiting for another's refresh.
POLL_INTERVAL = 0.05

# Delete the cached token only if it is the one that failed: a 401 seen by fifty workers at
# once drops the token once, not fifty times.
_DROP_IF_SAME = """
local cached = redis.call('GET', KEYS[1])
if cached and cjson.decode(cached)['token'] == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class BearerToken:
    token: str
    issued_at: float
    expires_at: float

    def renew_at(self) -> float:
        lifetime = max(self.expires_at - self.issued_at, 0.0)
        return self.expires_at - lifetime * RENEW_FRACTION

    def usable(self, now: float) -> bool:
        return now < self.expires_at - 1.0


def jwt_times(token: str, *, fetched_at: float, expires_in: float | None) -> tuple[float, float]:
    """(issued at, expires at) from the JWT's ``iat``/``exp``; ``expires_in`` as a fallback."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = float(claims["exp"])
        iat = float(claims.get("iat", fetched_at))
        return iat, exp
    except (IndexError, KeyError, ValueError, TypeError):
        if expires_in is None:
            raise ApsisAuthError("APSIS returned a token without an expiry") from None
        return fetched_at, fetched_at + expires_in


class TokenCache:
    """The pool's shared token for one account."""

    def __init__(
        self,
        client: redis.Redis,
        account: str,
        fetch: Callable[[], BearerToken],
        *,
        prefix: str = "apsis",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._fetch = fetch
        self._key = f"{prefix}:token:{account}"
        self._lock_key = f"{prefix}:token-lock:{account}"
        self._clock = clock
        self._drop = client.register_script(_DROP_IF_SAME)
        self._unlock = client.register_script(_UNLOCK)
        #: The token this process last read from the pool's cache, served without asking
        #: Redis again until its renewal time (every APSIS call needs it: 2-4 per export).
        self._memo: BearerToken | None = None
        #: Tokens APSIS refused to this process: never kept or served again, even when a
        #: thread read one from Redis just before another thread's 401 dropped it.
        self._refused: collections.deque[str] = collections.deque(maxlen=8)
        self._memo_lock = threading.Lock()

    def _cached(self) -> BearerToken | None:
        raw = self._client.get(self._key)
        if raw is None:
            return None
        data = json.loads(raw)
        return BearerToken(data["token"], data["issued_at"], data["expires_at"])

    def get(self) -> str:
        """A valid token: the cached one, or a fresh one fetched by exactly one process."""
        memo = self._memo
        if memo is not None and self._clock() < memo.renew_at() and memo.token not in self._refused:
            return memo.token
        deadline = self._clock() + WAIT_FOR_REFRESH
        while True:
            now = self._clock()
            cached = self._cached()
            if cached is not None and now < cached.renew_at():
                self._keep(cached)
                return cached.token
            if self._try_refresh():
                cached = self._cached()
                if cached is not None:
                    self._keep(cached)
                    return cached.token
            elif cached is not None and cached.usable(now):
                # Someone else is renewing; the current token is still good meanwhile.
                return cached.token
            if now > deadline:
                raise RetryableApsisError("timed out waiting for another process's token refresh")
            time.sleep(POLL_INTERVAL)

    def _keep(self, token: BearerToken) -> None:
        with self._memo_lock:
            if token.token not in self._refused:
                self._memo = token

    def _try_refresh(self) -> bool:
        owner = uuid.uuid4().hex
        if not self._client.set(self._lock_key, owner, nx=True, px=int(LOCK_SECONDS * 1000)):
            return False
        try:
            cached = self._cached()
            if cached is not None and self._clock() < cached.renew_at():
                return True  # renewed by another process between our look and our lock
            token = self._fetch()
            ttl_ms = int((token.expires_at - self._clock()) * 1000)
            if ttl_ms <= 0:
                raise ApsisAuthError("APSIS returned a token that has already expired")
            value = json.dumps(
                {"token": token.token, "issued_at": token.issued_at, "expires_at": token.expires_at}
            )
            self._client.set(self._key, value, px=ttl_ms)
            return True
        finally:
            self._unlock(keys=[self._lock_key], args=[owner])

    def invalidate(self, token: str) -> None:
        """Forget ``token`` (APSIS refused it) unless another process already replaced it."""
        with self._memo_lock:
            self._refused.append(token)
            if self._memo is not None and self._memo.token == token:
                self._memo = None
        self._drop(keys=[self._key], args=[token])
