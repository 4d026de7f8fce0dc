"""Callback tokens: HMAC-SHA256 over job id, attempt and expiry, carried in the callback URL.

The callback URL is the only secret APSIS gives back, so it carries a token that names the
job and the attempt, expires, and verifies in constant time against the current secret or
the previous one (for rotation).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import time
from dataclasses import dataclass

from worker.model.ids import is_job_id

#: Bytes of the HMAC kept in the token (128 bits: unguessable, keeps URLs short).
MAC_BYTES = 16


class InvalidCallbackToken(Exception):
    """The token is malformed or its MAC does not verify: a forgery or a typo."""


class ExpiredCallbackToken(Exception):
    """The token verifies but has expired."""


@dataclass(frozen=True)
class CallbackClaim:
    """What a verified token says: which job, which attempt, valid until when."""

    job_id: str
    attempt: int
    expires_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@functools.lru_cache(maxsize=8)
def _keyed(secret: str) -> hmac.HMAC:
    # The HMAC state after the key and the domain prefix: every token of a secret starts
    # from a copy of it (the webhook verifies one per callback, the pool issues one per
    # request). A few entries: the current secret and the previous one.
    return hmac.new(secret.encode(), b"callback:", hashlib.sha256)


def _mac(secret: str, payload: str) -> bytes:
    mac = _keyed(secret).copy()
    mac.update(payload.encode())
    return mac.digest()[:MAC_BYTES]


def issue(job_id: str, attempt: int, *, secret: str, ttl: int, now: float | None = None) -> str:
    """A token for ``job_id``'s ``attempt``, valid ``ttl`` seconds from ``now``."""
    if not is_job_id(job_id):
        raise ValueError("job id has characters a callback token cannot carry")
    expires_at = int((time.time() if now is None else now) + ttl)
    payload = f"{job_id}.{attempt}.{expires_at}"
    return f"{payload}.{_b64(_mac(secret, payload))}"


def verify(token: str, *, secrets: tuple[str, ...], now: float | None = None) -> CallbackClaim:
    """Check ``token`` against each secret (current first); raise if forged or expired."""
    # From the right: a batch item's job id has a dot of its own.
    parts = token.rsplit(".", 3)
    if len(parts) != 4 or not is_job_id(parts[0]):
        raise InvalidCallbackToken("malformed token")
    job_id, attempt_text, expiry_text, mac_text = parts
    if not (attempt_text.isdigit() and expiry_text.isdigit()) or len(mac_text) > 64:
        raise InvalidCallbackToken("malformed token")
    try:
        mac = _unb64(mac_text)
    except ValueError:
        raise InvalidCallbackToken("malformed token") from None
    payload = f"{job_id}.{attempt_text}.{expiry_text}"
    # compare_digest on every secret, so timing says nothing about which one matched.
    matched = False
    for secret in secrets:
        matched |= hmac.compare_digest(mac, _mac(secret, payload))
    if not matched:
        raise InvalidCallbackToken("token does not verify")
    claim = CallbackClaim(job_id, int(attempt_text), int(expiry_text))
    if claim.expires_at < (time.time() if now is None else now):
        raise ExpiredCallbackToken("token expired")
    return claim
