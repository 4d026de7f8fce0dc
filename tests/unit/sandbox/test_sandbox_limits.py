"""Tests for sandbox/limits.py: the sliding window, alone and behind the endpoints."""

from __future__ import annotations

import requests
from conftest import BASE, CallbackSink, export_and_wait, request_export

from sandbox.limits import RateLimiter, retry_after_header
from sandbox.state import SandboxState


def test_sliding_window_admits_n_per_trailing_window() -> None:
    now = [0.0]
    limiter = RateLimiter({"export": (2, 10.0)}, clock=lambda: now[0])
    assert limiter.admit("a", "export") is None
    now[0] = 5.0
    assert limiter.admit("a", "export") is None
    assert limiter.admit("a", "export") == 5.0
    assert limiter.admit("b", "export") is None  # per account
    now[0] = 10.0
    assert limiter.admit("a", "export") is None  # the first one left the window
    assert limiter.admit("a", "export") == 5.0


def test_none_disables_and_set_limit_changes_at_runtime() -> None:
    limiter = RateLimiter({"other": None})
    assert all(limiter.admit("a", "other") is None for _ in range(1000))
    limiter.set_limit("other", (1, 60.0))
    assert limiter.admit("a", "other") is None
    assert limiter.admit("a", "other") is not None


def test_retry_after_rounds_up_to_whole_seconds() -> None:
    assert retry_after_header(0.01) == "1"
    assert retry_after_header(1.2) == "2"


def test_export_limit_answers_429_with_retry_after(
    session: requests.Session, headers: dict[str, str], state: SandboxState
) -> None:
    state.patch_config({"limits": {"export": (1, 1.0)}})
    assert request_export(session, headers).status_code == 202
    limited = request_export(session, headers, "another-key")
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "1"
    assert limited.json()["status"] == 429
    statuses = [e["status"] for e in state.journal.entries(kind="export")]
    assert statuses == [202, 429]


def test_429_without_retry_after_when_faulted(
    session: requests.Session, headers: dict[str, str], state: SandboxState
) -> None:
    state.patch_config({"limits": {"export": (1, 60.0)}})
    state.set_faults({"default": {"omit_retry_after": True}})
    request_export(session, headers)
    limited = request_export(session, headers)
    assert limited.status_code == 429
    assert "Retry-After" not in limited.headers


def test_token_limit_is_ten_per_minute_by_default(session: requests.Session) -> None:
    body = {"grant_type": "client_credentials", "client_id": "sandbox", "client_secret": "sandbox"}
    statuses = [session.post(f"{BASE}/oauth/token", json=body).status_code for _ in range(11)]
    assert statuses == [200] * 10 + [429]


def test_download_limit(
    session: requests.Session, headers: dict[str, str], sink: CallbackSink, state: SandboxState
) -> None:
    url = export_and_wait(session, headers, sink)
    state.patch_config({"limits": {"download": (2, 60.0)}})
    statuses = [session.get(url, headers=headers).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
