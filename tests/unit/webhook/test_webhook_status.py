"""/status, /metrics and /readyz through the Flask test client, on fakeredis (no sockets)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
from flask import Flask
from flask.testing import FlaskClient

from webhook.app import create_app
from webhook.resources import WebhookResources
from webhook.status import public_reason
from worker.config import load_settings
from worker.model import callback_token
from worker.model.inbox import Inbox
from worker.model.jobs import ExportOptions, JobStore, State

SECRET = secrets.token_urlsafe(48)
TOKEN = secrets.token_urlsafe(32)


def _app(tmp_path: Any, **settings: Any) -> tuple[Flask, fakeredis.FakeRedis, JobStore]:
    server = fakeredis.FakeServer()
    app = create_app(
        load_settings(
            REDIS_URL="redis://127.0.0.1:1/0",
            CALLBACK_SECRET=SECRET,
            STORAGE_URL=f"file://{tmp_path}",
            **settings,
        )
    )
    app.config["TESTING"] = True
    fake = fakeredis.FakeRedis(server=server)
    fake.fake_server = server  # type: ignore[attr-defined]
    jobs = JobStore(fake)
    app.extensions["apsis"] = WebhookResources(
        app.extensions["apsis"].settings, fake, jobs, Inbox(fake)
    )
    return app, fake, jobs


@pytest.fixture
def status(tmp_path: Any) -> Iterator[tuple[FlaskClient, fakeredis.FakeRedis, JobStore]]:
    app, fake, jobs = _app(tmp_path, STATUS_TOKEN=TOKEN)
    yield app.test_client(), fake, jobs
    fake.close()


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_the_page_is_off_without_a_token_configured(tmp_path: Any) -> None:
    app, _, _ = _app(tmp_path)
    assert app.test_client().get("/status", headers=_auth()).status_code == 404


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}]
)
def test_the_page_needs_the_bearer_token(status: Any, headers: dict[str, str]) -> None:
    client, _, _ = status
    answer = client.get("/status", headers=headers)
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].lower().startswith("bearer")
    assert answer.get_json()["error"] == "unauthorized"


def test_the_page_shows_batches_states_failures_and_deadlines_escaped(status: Any) -> None:
    client, fake, jobs = status
    hostile = "<script>alert(1)</script>"
    fake.hset(
        "apsis:batch:b1",
        mapping={
            "state": "running",
            "total": 10,
            "submitted": 6,
            "done": 3,
            "failed": 1,
            "created_at": "1",
            "account": "default",
            "options": "{}",
            "max_in_flight": 10,
        },
    )
    fake.zadd("apsis:batches:running", {"b1": 1})
    for n in range(3):
        jobs.create(
            f"j{n}",
            export_key=f"person{n}@example.com",
            account="a",
            options=ExportOptions(),
            deadline_seconds=3600 * (n + 1),
        )
    reason = f"APSIS reported failure code 500: profile person0@example.com {hostile}"
    jobs.transition("j0", State.FAILED, note=reason, fields={"error": reason})
    jobs.create("j9", export_key="k", account="a", options=ExportOptions(), deadline_seconds=60)
    jobs.transition("j9", State.FAILED, fields={"error": f"storage: {hostile}"})

    answer = client.get("/status", headers=_auth())
    assert answer.status_code == 200
    assert answer.mimetype == "text/html"
    assert "default-src 'none'" in answer.headers["Content-Security-Policy"]
    html = answer.get_data(as_text=True)
    assert "b1" in html and "width: 30.0%" in html  # done 3 of 10
    assert "APSIS reported failure code 500 (message withheld)" in html
    assert "@example.com" not in html
    assert hostile not in html and "&lt;script&gt;" in html
    assert html.index("j1") < html.index("j2")  # nearest deadline first


def test_public_reason_withholds_apsis_text_and_caps_length() -> None:
    assert public_reason("APSIS reported failure code 410: gone for a@b.c") == (
        "APSIS reported failure code 410 (message withheld)"
    )
    assert len(public_reason("x" * 1000)) <= 240


def test_metrics_expose_pool_gauges_and_callback_counts(status: Any) -> None:
    client, _, jobs = status
    jobs.create("m1", export_key="k", account="a", options=ExportOptions(), deadline_seconds=99)
    jobs.transition("m1", State.REQUESTED, waiting_until=10**10)
    token = callback_token.issue("m1", 1, secret=SECRET, ttl=60)
    assert (
        client.post(f"/callbacks/{token}", json={"code": 100, "message": "ok"}).status_code == 202
    )
    client.post("/callbacks/not-a-token", json={"code": 100, "message": "ok"})
    answer = client.get("/metrics")
    assert answer.status_code == 200
    text = answer.get_data(as_text=True)
    assert 'apsis_export_jobs{state="requested"} 1.0' in text
    assert 'apsis_export_callbacks_received_total{code="100",outcome="recorded"}' in text
    assert 'apsis_export_callbacks_received_total{code="none",outcome="forbidden"}' in text
    assert "apsis_export_deadline_nearest_seconds" in text
    assert "m1" not in text


def test_readyz_names_what_failed(status: Any, tmp_path: Any) -> None:
    client, fake, _ = status
    assert client.get("/readyz").get_json() == {
        "status": "ok",
        "checks": {"redis": "ok", "storage": "ok"},
    }
    fake.fake_server.connected = False
    answer = client.get("/readyz")
    assert answer.status_code == 503
    assert answer.get_json()["checks"]["redis"].startswith("unavailable")
