"""POST /callbacks/<token>: verify, validate, record in the inbox, answer quickly."""

from __future__ import annotations

import json
import logging
from typing import Any

import redis
from flask import Blueprint, Request, Response, current_app, request
from werkzeug.exceptions import HTTPException

from webhook.resources import resources
from worker.model import callback_token, control_chars
from worker.telemetry import metrics

bp = Blueprint("callbacks", __name__)
log = logging.getLogger("apsis.webhook")

#: Longest ``message`` accepted, in characters (a download URL is ~150).
MAX_MESSAGE_CHARS = 2048
#: Callbacks one job may receive per window before the webhook answers 429.
FLOOD_LIMIT = 20
FLOOD_WINDOW_SECONDS = 60
JSON = "application/json"


class _Tally:
    """What the metrics count of one answer: APSIS's code (once valid) and the outcome."""

    __slots__ = ("code", "outcome")

    def __init__(self) -> None:
        self.code: int | None = None
        self.outcome = ""


def _json(body: dict[str, Any], status: int) -> Response:
    # Not jsonify: the app's JSON provider costs more than these flat bodies of strings need.
    return Response(json.dumps(body, separators=(",", ":")), status=status, content_type=JSON)


def _error(tally: _Tally, status: int, error: str, detail: str) -> Response:
    tally.outcome = error
    return _json({"error": error, "detail": detail}, status)


def _ok(tally: _Tally, status: str, job_id: str, http: int = 200) -> Response:
    tally.outcome = status
    return _json({"status": status, "job_id": job_id}, http)


@bp.post("/callbacks/<token>")
def receive(token: str) -> Response:
    """Every answer is counted by APSIS code and outcome: the handler's name for it, or
    ``http_<status>`` when an error handler answers (503: Redis unavailable)."""
    tally = _Tally()
    try:
        answer = _receive(token, tally)
    except Exception as exc:
        metrics.callback_received(tally.code, f"http_{_status_of(exc)}")
        raise
    metrics.callback_received(tally.code, tally.outcome)
    return answer


def _status_of(exc: Exception) -> int:
    """The status the app's error handlers answer ``exc`` with."""
    if isinstance(exc, HTTPException):
        return exc.code or 500
    return 503 if isinstance(exc, redis.RedisError) else 500


def _receive(token: str, tally: _Tally) -> Response:
    res = resources(current_app)
    try:
        claim = callback_token.verify(token, secrets=res.secrets)
    except callback_token.ExpiredCallbackToken:
        log.warning("callback with an expired token refused", extra={"status": 410})
        return _error(tally, 410, "expired", "callback token expired")
    except callback_token.InvalidCallbackToken:
        log.warning("callback with an invalid token refused", extra={"status": 403})
        return _error(tally, 403, "forbidden", "invalid callback token")

    limit = res.settings.CALLBACK_MAX_BYTES
    req = request._get_current_object()  # type: ignore[attr-defined]  # one proxy lookup
    length = req.content_length
    if length is not None and length > limit:
        return _error(tally, 413, "too_large", f"body is larger than {limit} bytes")
    if req.mimetype != JSON:
        return _error(tally, 415, "unsupported_media_type", "send application/json")
    raw = _body(req, length, limit)
    if raw is None:
        return _error(tally, 413, "too_large", f"body is larger than {limit} bytes")
    try:
        body: Any = json.loads(raw)
    except ValueError:  # not JSON, or not UTF-8 (UnicodeDecodeError is a ValueError)
        body = None
    if not isinstance(body, dict):
        return _error(tally, 400, "bad_request", "body must be a JSON object")
    code, message = body.get("code"), body.get("message")
    if not isinstance(code, int) or isinstance(code, bool):
        return _error(tally, 422, "invalid", "'code' must be an integer")
    if not isinstance(message, str):
        return _error(tally, 422, "invalid", "'message' must be a string")
    if not 100 <= code <= 599:
        return _error(tally, 422, "invalid", "'code' must be between 100 and 599")
    tally.code = code  # for the metrics: a valid code, whatever the outcome
    if len(message) > MAX_MESSAGE_CHARS:
        return _error(
            tally, 422, "invalid", f"'message' is longer than {MAX_MESSAGE_CHARS} characters"
        )
    if not message.isascii():
        try:
            # JSON may carry lone surrogates ("\ud800"): no UTF-8 form, so Redis cannot store them.
            message.encode()
        except UnicodeEncodeError:
            return _error(tally, 422, "invalid", "'message' is not valid Unicode text")
    if control_chars.has_control(message):
        # ESC sequences, newlines, bidi overrides: they reach an operator's terminal and logs.
        return _error(tally, 422, "invalid", "'message' contains control characters")

    outcome, entry = res.inbox.record(
        job_key=res.jobs.key(claim.job_id),
        job_id=claim.job_id,
        attempt=claim.attempt,
        code=code,
        message=message,
        flood_limit=FLOOD_LIMIT,
        flood_window=FLOOD_WINDOW_SECONDS,
    )
    if outcome == "recorded":
        tally.outcome = outcome
        # DEBUG: one line per callback is an access log (gunicorn's is off too); the job's
        # history records what each callback did, and the counter counts it.
        if log.isEnabledFor(logging.DEBUG):
            log.debug("callback recorded", extra={**_ctx(claim), "code": code})
        return _json({"status": "recorded", "job_id": claim.job_id, "entry": entry}, 202)
    if outcome == "unknown":
        log.info("callback for an unknown job", extra={**_ctx(claim), "status": 404})
        return _error(tally, 404, "not_found", "no such job")
    if outcome in ("ignored", "duplicate"):
        # Repeats answer 2xx (so APSIS stops retrying) but record nothing and resume nothing.
        return _ok(tally, outcome, claim.job_id)
    # flood
    log.warning("callback flood refused", extra={**_ctx(claim), "status": 429})
    response = _error(tally, 429, "too_many_requests", "too many callbacks for this job")
    response.headers["Retry-After"] = str(FLOOD_WINDOW_SECONDS)
    return response


def _body(req: Request, length: int | None, limit: int) -> bytes | None:
    """The request's body, read straight from the server's input (werkzeug's stream
    wrappers cost more than the rest of the parse); None if it is larger than ``limit``.
    Without a Content-Length (chunked), at most ``limit`` + 1 bytes are read: werkzeug's
    own reader would cut such a body at the limit without a word."""
    stream = req.environ["wsgi.input"]
    if length is None:
        data: bytes = stream.read(limit + 1)
        return None if len(data) > limit else data
    data = stream.read(length)
    return data


def _ctx(claim: callback_token.CallbackClaim) -> dict[str, Any]:
    return {"job_id": claim.job_id, "attempt": claim.attempt}
