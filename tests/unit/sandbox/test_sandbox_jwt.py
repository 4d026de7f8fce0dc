"""Tests for sandbox/jwt.py: HS256 round trip, tampering and expiry."""

from __future__ import annotations

import pytest

from sandbox import jwt

KEY = b"k" * 32


def test_round_trip_keeps_claims() -> None:
    claims = {"sub": "c", "account": "a", "iat": 100, "exp": 200, "jti": "j"}
    assert jwt.verify(jwt.sign(claims, KEY), KEY, now=150) == claims


def test_expired_token_is_refused() -> None:
    token = jwt.sign({"exp": 200}, KEY)
    with pytest.raises(jwt.TokenExpired):
        jwt.verify(token, KEY, now=200)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t + "x",
        lambda t: t.rsplit(".", 1)[0] + ".AAAA",
        lambda t: "abc",
        lambda t: "a.b.c",
    ],
)
def test_tampered_token_is_refused(mangle: object) -> None:
    token = jwt.sign({"exp": 10**12}, KEY)
    with pytest.raises(jwt.TokenError):
        jwt.verify(mangle(token), KEY, now=0)  # type: ignore[operator]


def test_other_key_is_refused() -> None:
    with pytest.raises(jwt.TokenError):
        jwt.verify(jwt.sign({"exp": 10**12}, KEY), b"other", now=0)
