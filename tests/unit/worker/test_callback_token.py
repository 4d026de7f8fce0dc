"""Callback tokens: what verifies, what is refused, and secret rotation."""

from __future__ import annotations

import pytest

from worker.model.callback_token import (
    CallbackClaim,
    ExpiredCallbackToken,
    InvalidCallbackToken,
    issue,
    verify,
)

SECRET = "s" * 48
PREVIOUS = "p" * 48
NOW = 1_700_000_000.0
TTL = 3600


def _token(job_id: str = "job-1", attempt: int = 2, *, secret: str = SECRET) -> str:
    return issue(job_id, attempt, secret=secret, ttl=TTL, now=NOW)


def test_round_trip_names_job_attempt_and_expiry() -> None:
    claim = verify(_token(), secrets=(SECRET,), now=NOW + 1)
    assert claim == CallbackClaim(job_id="job-1", attempt=2, expires_at=int(NOW) + TTL)


def test_token_is_url_safe() -> None:
    token = _token("a" * 64)
    assert all(c.isalnum() or c in "-_." for c in token)


@pytest.mark.parametrize("part", [0, 1, 2, 3], ids=["job_id", "attempt", "expiry", "mac"])
def test_tampered_part_refused(part: int) -> None:
    parts = _token().split(".")
    replacement = {0: "job-2", 1: "3", 2: str(int(NOW) + TTL * 100)}
    if part == 3:
        mac = parts[3]
        parts[3] = ("A" if mac[0] != "A" else "B") + mac[1:]
    else:
        parts[part] = replacement[part]
    with pytest.raises(InvalidCallbackToken):
        verify(".".join(parts), secrets=(SECRET,), now=NOW)


def test_wrong_secret_refused() -> None:
    with pytest.raises(InvalidCallbackToken):
        verify(_token(secret="x" * 48), secrets=(SECRET,), now=NOW)


def test_expired_token_refused_as_expired() -> None:
    token = _token()
    with pytest.raises(ExpiredCallbackToken):
        verify(token, secrets=(SECRET,), now=NOW + TTL + 1)


def test_forged_expired_token_is_invalid_not_expired() -> None:
    # An attacker must not learn anything about expiry without the secret.
    token = _token(secret="x" * 48)
    with pytest.raises(InvalidCallbackToken):
        verify(token, secrets=(SECRET,), now=NOW + TTL + 1)


def test_token_from_previous_secret_verifies_during_rotation() -> None:
    token = _token(secret=PREVIOUS)
    claim = verify(token, secrets=(SECRET, PREVIOUS), now=NOW)
    assert claim.job_id == "job-1"


def test_token_from_previous_secret_refused_after_rotation_ends() -> None:
    token = _token(secret=PREVIOUS)
    with pytest.raises(InvalidCallbackToken):
        verify(token, secrets=(SECRET,), now=NOW)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "job-1.2.3",
        "job-1.2.3.mac.extra",
        "job-1.x.1700003600.AAAAAAAAAAAAAAAAAAAAAA",
        "job-1.2.17000036OO.AAAAAAAAAAAAAAAAAAAAAA",
        "job-1.-2.1700003600.AAAAAAAAAAAAAAAAAAAAAA",
        "job-1.².1700003600.AAAAAAAAAAAAAAAAAAAAAA",
        "job-1.2.1700003600.é",
        "job-1.2.1700003600.A",
        "job-1.2.1700003600." + "A" * 65,
        "j" * 65 + ".2.1700003600.AAAAAAAAAAAAAAAAAAAAAA",
        "job/1.2.1700003600.AAAAAAAAAAAAAAAAAAAAAA",
        "job-1\n.2.1700003600.AAAAAAAAAAAAAAAAAAAAAA",
    ],
    ids=[
        "empty",
        "three-parts",
        "five-parts",
        "attempt-not-digits",
        "expiry-not-digits",
        "negative-attempt",
        "unicode-digit",
        "mac-not-base64",
        "mac-bad-padding",
        "mac-overlong",
        "job-id-overlong",
        "job-id-slash",
        "job-id-newline",
    ],
)
def test_malformed_token_refused(token: str) -> None:
    with pytest.raises(InvalidCallbackToken):
        verify(token, secrets=(SECRET,), now=NOW)


@pytest.mark.parametrize("job_id", ["a.b", "a/b", "", "j" * 65, "a b", "a\n"])
def test_job_id_a_token_cannot_carry_refused_at_issue(job_id: str) -> None:
    with pytest.raises(ValueError, match="job id"):
        issue(job_id, 1, secret=SECRET, ttl=TTL, now=NOW)
