"""POST /callbacks/<token> through the Flask test client, on fakeredis (no sockets)."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fakeredis
import pytest
from flask import Flask
from flask.testing import FlaskClient

from webhook.app import create_app
from webhook.callbacks import FLOOD_LIMIT, MAX_MESSAGE_CHARS
from webhook.resources import WebhookResources
from worker.config import Settings, load_settings
from worker.model import callback_token
from worker.model.inbox import STREAM, Inbox
from worker.model.jobs import ExportOptions, JobStore, State
from worker.telemetry import metrics

SECRET = secrets.token_urlsafe(48)
PREVIOUS = secrets.token_urlsafe(48)
JOB_ID = "job-1"
MAX_BYTES = 1024
DOWNLOAD_URL = "https://api.apsis.one/audience/profiles/export-single/accounts/test/definitions/x"


@dataclass
class Webhook:
    app: Flask
    client: FlaskClient
    server: fakeredis.FakeServer
    redis: fakeredis.FakeRedis
    jobs: JobStore
    settings: Settings

    def token(self, job_id: str = JOB_ID, attempt: int = 1, *, ttl: int = 3600) -> str:
        return callback_token.issue(job_id, attempt, secret=SECRET, ttl=ttl)

    def post(self, token: str | None = None, body: Any = None, **kwargs: Any) -> Any:
        url = f"/callbacks/{token or self.token()}"
        if body is not None:
            kwargs["json"] = body
        return self.client.post(url, **kwargs)

    def inbox_length(self) -> int:
        return int(self.redis.xlen(STREAM))

    def state(self, job_id: str = JOB_ID) -> State:
        return self.jobs.get(job_id).state


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    settings = load_settings(
        REDIS_URL="redis://127.0.0.1:1/0",  # never connected: replaced by fakeredis below
        CALLBACK_SECRET=SECRET,
        CALLBACK_MAX_BYTES=MAX_BYTES,
    )
    app = create_app(settings)
    app.config["TESTING"] = True
    server = fakeredis.FakeServer()
    fake = fakeredis.FakeRedis(server=server)
    jobs = JobStore(fake)
    app.extensions["apsis"] = WebhookResources(settings, fake, jobs, Inbox(fake))
    jobs.create(JOB_ID, export_key="k", account="a", options=ExportOptions(), deadline_seconds=3600)
    jobs.transition(JOB_ID, State.REQUESTED)
    yield Webhook(app, app.test_client(), server, fake, jobs, settings)
    fake.close()


def _assert_refused(response: Any, status: int, webhook: Webhook) -> dict[str, Any]:
    assert response.status_code == status
    assert response.mimetype == "application/json"
    body: dict[str, Any] = response.get_json()
    assert isinstance(body.get("error"), str) and body["error"]
    assert isinstance(body.get("detail"), str)
    assert webhook.inbox_length() == 0
    assert webhook.state() == State.REQUESTED
    return body


# --- the happy path -------------------------------------------------------------------


def test_verified_and_ready_callbacks_are_recorded(webhook: Webhook) -> None:
    first = webhook.post(body={"code": 100, "message": "Callback verified"})
    second = webhook.post(body={"code": 200, "message": DOWNLOAD_URL})

    assert first.status_code == 202 and second.status_code == 202
    assert first.get_json()["status"] == "recorded"
    assert first.get_json()["job_id"] == JOB_ID
    entries: list[tuple[bytes, dict[bytes, bytes]]] = webhook.redis.xrange(STREAM)  # type: ignore[assignment]
    assert [entry_id.decode() for entry_id, _ in entries] == [
        first.get_json()["entry"],
        second.get_json()["entry"],
    ]
    fields = [{k.decode(): v.decode() for k, v in f.items()} for _, f in entries]
    assert [(f["job_id"], f["attempt"], f["code"], f["message"]) for f in fields] == [
        (JOB_ID, "1", "100", "Callback verified"),
        (JOB_ID, "1", "200", DOWNLOAD_URL),
    ]
    # The webhook only records: the consumer, not the webhook, moves the job.
    assert webhook.state() == State.REQUESTED


def test_charset_parameter_on_json_is_accepted(webhook: Webhook) -> None:
    response = webhook.post(
        data=b'{"code": 100, "message": "Callback verified"}',
        content_type="application/json; charset=utf-8",
    )
    assert response.status_code == 202
    assert webhook.inbox_length() == 1


def test_token_signed_with_previous_secret_accepted_during_rotation(webhook: Webhook) -> None:
    settings = load_settings(
        REDIS_URL="redis://127.0.0.1:1/0", CALLBACK_SECRET=SECRET, CALLBACK_SECRET_PREVIOUS=PREVIOUS
    )
    res = webhook.app.extensions["apsis"]
    webhook.app.extensions["apsis"] = WebhookResources(settings, res.redis, res.jobs, res.inbox)
    token = callback_token.issue(JOB_ID, 1, secret=PREVIOUS, ttl=3600)
    response = webhook.post(token, body={"code": 100, "message": "Callback verified"})
    assert response.status_code == 202
    assert webhook.inbox_length() == 1


# --- bad requests: refused, nothing recorded, the job untouched -------------------------


@pytest.mark.parametrize("method", ["get", "put", "delete", "patch"])
def test_wrong_method_refused(webhook: Webhook, method: str) -> None:
    response = getattr(webhook.client, method)(
        f"/callbacks/{webhook.token()}", json={"code": 100, "message": "Callback verified"}
    )
    _assert_refused(response, 405, webhook)
    assert "POST" in response.headers["Allow"]


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/jsonx"]
)
def test_wrong_content_type_refused(webhook: Webhook, content_type: str) -> None:
    response = webhook.post(
        data=b'{"code": 100, "message": "Callback verified"}', content_type=content_type
    )
    _assert_refused(response, 415, webhook)


def test_missing_content_type_refused(webhook: Webhook) -> None:
    response = webhook.post(data=b'{"code": 100, "message": "Callback verified"}')
    _assert_refused(response, 415, webhook)


def test_body_over_limit_refused(webhook: Webhook) -> None:
    message = "x" * MAX_BYTES
    response = webhook.post(body={"code": 200, "message": message})
    _assert_refused(response, 413, webhook)


def test_declared_length_over_limit_refused_before_reading(webhook: Webhook) -> None:
    # A small body under a large Content-Length: refused on the header, the body unread.
    body = b'{"code": 100, "message": "Callback verified"}'
    response = webhook.post(
        data=body,
        content_type="application/json",
        environ_overrides={"CONTENT_LENGTH": str(MAX_BYTES * 1000)},
    )
    _assert_refused(response, 413, webhook)


@pytest.mark.parametrize(
    "data", [b"", b"{", b'{"code": 100,}', b"\xff\xfe", b"{'code': 100}"], ids=repr
)
def test_invalid_json_refused(webhook: Webhook, data: bytes) -> None:
    response = webhook.post(data=data, content_type="application/json")
    _assert_refused(response, 400, webhook)


@pytest.mark.parametrize("body", [[], [100, "x"], "text", 200, None], ids=repr)
def test_json_that_is_not_an_object_refused(webhook: Webhook, body: Any) -> None:
    response = webhook.post(data=json.dumps(body), content_type="application/json")
    _assert_refused(response, 400, webhook)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"message": "Callback verified"},
        {"code": 100},
        {"code": "100", "message": "Callback verified"},
        {"code": 100.0, "message": "Callback verified"},
        {"code": True, "message": "Callback verified"},
        {"code": None, "message": "Callback verified"},
        {"code": 100, "message": None},
        {"code": 100, "message": 5},
        {"code": 100, "message": ["x"]},
    ],
    ids=repr,
)
def test_missing_or_mistyped_fields_refused(webhook: Webhook, body: dict[str, Any]) -> None:
    response = webhook.post(body=body)
    body_out = _assert_refused(response, 422, webhook)
    assert "code" in body_out["detail"] or "message" in body_out["detail"]


@pytest.mark.parametrize("code", [-1, 0, 99, 600, 10**6])
def test_code_out_of_range_refused(webhook: Webhook, code: int) -> None:
    response = webhook.post(body={"code": code, "message": "x"})
    _assert_refused(response, 422, webhook)


def test_overlong_message_refused(webhook: Webhook) -> None:
    settings = load_settings(REDIS_URL="redis://127.0.0.1:1/0", CALLBACK_SECRET=SECRET)
    webhook.app.config["MAX_CONTENT_LENGTH"] = settings.CALLBACK_MAX_BYTES
    res = webhook.app.extensions["apsis"]
    webhook.app.extensions["apsis"] = WebhookResources(settings, res.redis, res.jobs, res.inbox)
    response = webhook.post(body={"code": 200, "message": "x" * (MAX_MESSAGE_CHARS + 1)})
    _assert_refused(response, 422, webhook)


def test_message_that_is_not_valid_unicode_refused(webhook: Webhook) -> None:
    # "\ud800" is valid JSON but a lone surrogate: no UTF-8 form, so it cannot be stored.
    response = webhook.post(
        data=b'{"code": 500, "message": "\\ud800"}', content_type="application/json"
    )
    _assert_refused(response, 422, webhook)


@pytest.mark.parametrize(
    "message",
    [
        # Clears the screen, sets the window title, prints a fake line on the operator's tty.
        "Export failed\x1b[2J\x1b]0;pwned\x07\r\x1b[32mexport done\x1b[0m",
        "Export failed\nstate     done",
        "Export failed\x00",
        "Export failed\u202e",  # a right-to-left override
        "Export failed\u2028",  # a line separator
    ],
    ids=["esc", "newline", "nul", "bidi-override", "line-separator"],
)
def test_message_with_control_characters_refused(webhook: Webhook, message: str) -> None:
    response = webhook.post(body={"code": 500, "message": message})
    body = _assert_refused(response, 422, webhook)
    assert body["detail"] == "'message' contains control characters"


@pytest.mark.parametrize(
    "token",
    ["forged", "job-1.1.9999999999.AAAAAAAAAAAAAAAAAAAAAA", "job-1.1.9999999999." + "A" * 65],
)
def test_forged_token_refused(webhook: Webhook, token: str) -> None:
    body = _assert_refused(webhook.post(token, body={"code": 100, "message": "x"}), 403, webhook)
    assert body["error"] == "forbidden"


def test_token_of_another_job_relabelled_refused(webhook: Webhook) -> None:
    webhook.jobs.create(
        "job-2", export_key="k2", account="a", options=ExportOptions(), deadline_seconds=3600
    )
    _job, attempt, expiry, mac = webhook.token("job-2").split(".")
    relabelled = f"{JOB_ID}.{attempt}.{expiry}.{mac}"
    _assert_refused(webhook.post(relabelled, body={"code": 100, "message": "x"}), 403, webhook)


def test_token_signed_with_another_secret_refused(webhook: Webhook) -> None:
    token = callback_token.issue(JOB_ID, 1, secret="o" * 48, ttl=3600)
    _assert_refused(webhook.post(token, body={"code": 100, "message": "x"}), 403, webhook)


def test_expired_token_refused_as_gone(webhook: Webhook) -> None:
    token = callback_token.issue(JOB_ID, 1, secret=SECRET, ttl=10, now=time.time() - 60)
    body = _assert_refused(webhook.post(token, body={"code": 100, "message": "x"}), 410, webhook)
    assert body["error"] == "expired"


def test_valid_token_for_unknown_job_not_found(webhook: Webhook) -> None:
    response = webhook.post(webhook.token("no-such-job"), body={"code": 100, "message": "x"})
    _assert_refused(response, 404, webhook)
    assert not webhook.jobs.exists("no-such-job")


# --- repeats: answered 2xx (so APSIS stops), nothing recorded ---------------------------


def test_callback_for_an_older_attempt_ignored(webhook: Webhook) -> None:
    webhook.jobs.transition(JOB_ID, State.QUEUED, new_attempt=True)
    webhook.jobs.transition(JOB_ID, State.REQUESTED)
    response = webhook.post(webhook.token(attempt=1), body={"code": 200, "message": DOWNLOAD_URL})
    assert response.status_code == 200
    assert response.get_json() == {"status": "ignored", "job_id": JOB_ID}
    assert webhook.inbox_length() == 0
    assert webhook.jobs.get(JOB_ID).attempt == 2


@pytest.mark.parametrize("final", [State.DONE, State.FAILED])
@pytest.mark.parametrize("code", [100, 200, 500])
def test_replay_after_job_ended_ignored(webhook: Webhook, final: State, code: int) -> None:
    webhook.jobs.transition(JOB_ID, State.READY)
    if final == State.DONE:
        webhook.jobs.transition(JOB_ID, State.DONE)
    else:
        webhook.jobs.transition(JOB_ID, State.FAILED, fields={"error": "boom"})
    response = webhook.post(body={"code": code, "message": DOWNLOAD_URL})
    assert response.status_code == 200
    assert response.get_json() == {"status": "ignored", "job_id": JOB_ID}
    assert webhook.inbox_length() == 0
    assert webhook.state() == final


@pytest.mark.parametrize("code", [100, 200])
def test_repeat_while_ready_is_duplicate(webhook: Webhook, code: int) -> None:
    webhook.jobs.transition(JOB_ID, State.READY)
    response = webhook.post(body={"code": code, "message": DOWNLOAD_URL})
    assert response.status_code == 200
    assert response.get_json() == {"status": "duplicate", "job_id": JOB_ID}
    assert webhook.inbox_length() == 0
    assert webhook.state() == State.READY


def test_verified_again_after_verified_is_duplicate(webhook: Webhook) -> None:
    webhook.jobs.transition(JOB_ID, State.VERIFIED)
    response = webhook.post(body={"code": 100, "message": "Callback verified"})
    assert response.status_code == 200
    assert response.get_json()["status"] == "duplicate"
    assert webhook.inbox_length() == 0


# --- limits and outages ---------------------------------------------------------------


def test_flood_to_one_job_refused_with_retry_after(webhook: Webhook) -> None:
    for _ in range(FLOOD_LIMIT):
        assert webhook.post(body={"code": 100, "message": "Callback verified"}).status_code == 202

    response = webhook.post(body={"code": 200, "message": DOWNLOAD_URL})

    assert response.status_code == 429
    assert response.get_json()["error"] == "too_many_requests"
    assert int(response.headers["Retry-After"]) > 0
    assert webhook.inbox_length() == FLOOD_LIMIT
    assert webhook.state() == State.REQUESTED


def test_flood_on_one_job_leaves_others_alone(webhook: Webhook) -> None:
    webhook.jobs.create(
        "job-2", export_key="k2", account="a", options=ExportOptions(), deadline_seconds=3600
    )
    webhook.jobs.transition("job-2", State.REQUESTED)
    for _ in range(FLOOD_LIMIT + 1):
        webhook.post(body={"code": 100, "message": "Callback verified"})
    response = webhook.post(webhook.token("job-2"), body={"code": 100, "message": "x"})
    assert response.status_code == 202


def test_redis_down_answers_503_with_retry_after(webhook: Webhook) -> None:
    webhook.server.connected = False
    response = webhook.post(body={"code": 200, "message": DOWNLOAD_URL})
    assert response.status_code == 503
    assert response.get_json()["error"] == "unavailable"
    assert int(response.headers["Retry-After"]) > 0
    webhook.server.connected = True
    assert webhook.inbox_length() == 0
    assert webhook.state() == State.REQUESTED


def _received(code: str, outcome: str) -> float:
    value: float = metrics.metrics().callbacks_received.labels(code, outcome)._value.get()
    return value


def test_chunked_body_over_limit_refused(webhook: Webhook) -> None:
    # No Content-Length to refuse on: the body is read up to the limit, and refused past it.
    response = webhook.client.post(
        f"/callbacks/{webhook.token()}",
        data=b'{"code": 200, "message": "' + b"x" * MAX_BYTES + b'"}',
        content_type="application/json",
        headers={"Transfer-Encoding": "chunked"},  # werkzeug then ignores Content-Length
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert _assert_refused(response, 413, webhook)["error"] == "too_large"


def test_answers_from_error_handlers_are_counted_by_status(webhook: Webhook) -> None:
    before = _received("200", "http_503")
    webhook.server.connected = False
    assert webhook.post(body={"code": 200, "message": DOWNLOAD_URL}).status_code == 503
    webhook.server.connected = True
    assert _received("200", "http_503") == before + 1


def test_health_answers_ok(webhook: Webhook) -> None:
    response = webhook.client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_unknown_path_is_json_404(webhook: Webhook) -> None:
    response = webhook.client.post("/callbacks/", json={"code": 100, "message": "x"})
    assert response.status_code == 404
    assert response.get_json()["error"] == "not found"
