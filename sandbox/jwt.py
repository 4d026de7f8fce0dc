"""HS256 JSON Web Tokens, signed and verified with the standard library only."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any


class TokenError(Exception):
    """The token is malformed, badly signed or not for us."""


class TokenExpired(TokenError):
    """The token's `exp` claim is in the past."""


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    # JWT strips base64 padding; restore it before decoding.
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_HEADER = _b64encode(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())


def sign(claims: dict[str, Any], key: bytes) -> str:
    """Encode `claims` as a compact HS256 JWT."""
    payload = _b64encode(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{_HEADER}.{payload}".encode("ascii")
    signature = hmac.new(key, signing_input, hashlib.sha256).digest()
    return f"{_HEADER}.{payload}.{_b64encode(signature)}"


def verify(token: str, key: bytes, *, now: float) -> dict[str, Any]:
    """Return the claims of a token signed with `key`; raise TokenError or TokenExpired."""
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError("not a compact JWT")
    header_b64, payload_b64, signature_b64 = parts
    try:
        header = json.loads(_b64decode(header_b64))
        signature = _b64decode(signature_b64)
        claims = json.loads(_b64decode(payload_b64))
    except (ValueError, UnicodeDecodeError) as exc:
        raise TokenError("undecodable JWT") from exc
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        raise TokenError("unsupported JWT algorithm")
    expected = hmac.new(key, f"{header_b64}.{payload_b64}".encode("ascii"), hashlib.sha256)
    if not hmac.compare_digest(expected.digest(), signature):
        raise TokenError("bad JWT signature")
    if not isinstance(claims, dict):
        raise TokenError("JWT claims are not an object")
    exp = claims.get("exp")
    if not isinstance(exp, int | float):
        raise TokenError("JWT has no exp claim")
    if now >= exp:
        raise TokenExpired("JWT expired")
    return claims
