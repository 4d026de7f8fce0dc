"""Fixtures for the sandbox unit tests: an in-process app, a Session on it, a callback sink."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from flask import Flask
from sandbox_in_process import sandbox_app, sandbox_session

from sandbox.app import sandbox_state
from sandbox.config import SandboxConfig
from sandbox.state import SandboxState

BASE = "http://sandbox.test"
CALLBACK_URL = "https://receiver.test/callbacks/job-1?token=s3cret"


class CallbackSink:
    """Stands in for the product's webhook: records callbacks, answers `status`."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.statuses: list[int | Exception] = []
        self._lock = threading.Lock()

    def __call__(self, url: str, body: dict[str, Any]) -> int:
        with self._lock:
            self.received.append((url, body))
            answer = self.statuses.pop(0) if self.statuses else 204
        if isinstance(answer, Exception):
            raise answer
        return answer

    def wait(self, count: int, timeout: float = 3.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.received) >= count:
                    return [body for _, body in self.received]
            time.sleep(0.005)
        raise AssertionError(f"expected {count} callbacks, got {self.received}")

    def codes(self) -> list[int]:
        with self._lock:
            return [body["code"] for _, body in self.received]


@pytest.fixture
def config() -> SandboxConfig:
    # Fast callbacks and no export limit: rate-limit tests set their own limits.
    return SandboxConfig(
        verify_delay=0.0, ready_delay=0.02, callback_backoff=0.01, limits={"export": None}
    )


@pytest.fixture
def sink() -> CallbackSink:
    return CallbackSink()


@pytest.fixture
def app(config: SandboxConfig, sink: CallbackSink) -> Iterator[Flask]:
    with sandbox_app(config, sink) as app:
        yield app


@pytest.fixture
def state(app: Flask) -> SandboxState:
    return sandbox_state(app)


@pytest.fixture
def session(app: Flask) -> Iterator[requests.Session]:
    with sandbox_session(app, BASE) as session:
        yield session


def fetch_token(
    session: requests.Session, client_id: str = "sandbox", secret: str = "sandbox"
) -> str:
    response = session.post(
        f"{BASE}/oauth/token",
        json={"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret},
    )
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


@pytest.fixture
def headers(session: requests.Session) -> dict[str, str]:
    return {"Authorization": f"Bearer {fetch_token(session)}"}


def request_export(
    session: requests.Session,
    headers: dict[str, str],
    export_key: str = "ABC-123",
    **options: Any,
) -> requests.Response:
    body = {"callback_url": CALLBACK_URL, **options}
    return session.post(
        f"{BASE}/audience/profiles/export-single/{export_key}", json=body, headers=headers
    )


def export_and_wait(
    session: requests.Session,
    headers: dict[str, str],
    sink: CallbackSink,
    export_key: str = "ABC-123",
    **options: Any,
) -> str:
    """Request an export and return the download URL from its ready callback."""
    response = request_export(session, headers, export_key, **options)
    assert response.status_code == 202, response.text
    bodies = sink.wait(2)
    ready = [body for body in bodies if body["code"] == 200]
    assert ready, bodies
    url: str = ready[-1]["message"]
    return url
