"""POST /callbacks/<token>: verify, validate, record in the inbox, answer quickly."""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Blueprint, Response, current_app, g, request

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


def _json(body: dict[str, Any], status: int) -> tuple[Response, int]:
    # Not jsonify: the app's JSON provider costs more than these flat bodies of strings need.
    return Response(json.dumps(body, separators=(",", ":")), mimetype="application/json"), status


def _error(status: int, error: str, detail: str) -> tuple[Response, int]:
    g.callback_outcome = error
    return _json({"error": error, "detail": detail}, status)


def _ok(status: str, job_id: str, http: int = 200) -> tuple[Response, int]:
    g.callback_outcome = status
    return _json({"status": status, "job_id": job_id}, http)


@bp.post("/callbacks/<token>")
def receive(token: str) -> tuple[Response, int]:
    res = resources(current_app)
    try:
        claim = callback_token.verify(token, secrets=res.secrets)
    except callback_token.ExpiredCallbackToken:
        log.warning("callback with an expired token refused", extra={"status": 410})
        return _error(410, "expired", "callback token expired")
    except callback_token.InvalidCallbackToken:
        log.warning("callback with an invalid token refused", extra={"status": 403})
        return _error(403, "forbidden", "invalid callback token")
    ctx = {"job_id": claim.job_id, "attempt": claim.attempt}

    limit = res.settings.CALLBACK_MAX_BYTES
    if request.content_length is not None and request.content_length > limit:
        return _error(413, "too_large", f"body is larger than {limit} bytes")
    if request.mimetype != "application/json":
        return _error(415, "unsupported_media_type", "send application/json")
    try:
        body: Any = json.loads(request.get_data(cache=False))
    except ValueError:  # not JSON, or not UTF-8 (UnicodeDecodeError is a ValueError)
        body = None
    if not isinstance(body, dict):
        return _error(400, "bad_request", "body must be a JSON object")
    code, message = body.get("code"), body.get("message")
    if not isinstance(code, int) or isinstance(code, bool):
        return _error(422, "invalid", "'code' must be an integer")
    if not isinstance(message, str):
        return _error(422, "invalid", "'message' must be a string")
    if not 100 <= code <= 599:
        return _error(422, "invalid", "'code' must be between 100 and 599")
    g.callback_code = code  # for the metrics: a valid code, whatever the outcome
    if len(message) > MAX_MESSAGE_CHARS:
        return _error(422, "invalid", f"'message' is longer than {MAX_MESSAGE_CHARS} characters")
    if not message.isascii():
        try:
            # JSON may carry lone surrogates ("\ud800"): no UTF-8 form, so Redis cannot store them.
            message.encode()
        except UnicodeEncodeError:
            return _error(422, "invalid", "'message' is not valid Unicode text")
    if control_chars.has_control(message):
        # ESC sequences, newlines, bidi overrides: they reach an operator's terminal and logs.
        return _error(422, "invalid", "'message' contains control characters")

    outcome, entry = res.inbox.record(
        job_key=res.jobs.key(claim.job_id),
        job_id=claim.job_id,
        attempt=claim.attempt,
        code=code,
        message=message,
        flood_limit=FLOOD_LIMIT,
        flood_window=FLOOD_WINDOW_SECONDS,
    )
    if outcome == "unknown":
        log.info("callback for an unknown job", extra={**ctx, "status": 404})
        return _error(404, "not_found", "no such job")
    if outcome in ("ignored", "duplicate"):
        # Repeats answer 2xx (so APSIS stops retrying) but record nothing and resume nothing.
        return _ok(outcome, claim.job_id)
    if outcome == "flood":
        log.warning("callback flood refused", extra={**ctx, "status": 429})
        response, status = _error(429, "too_many_requests", "too many callbacks for this job")
        response.headers["Retry-After"] = str(FLOOD_WINDOW_SECONDS)
        return response, status
    g.callback_outcome = "recorded"
    # DEBUG: one line per callback is an access log (gunicorn's is off too); the job's
    # history records what each callback did, and the counter counts it.
    log.debug("callback recorded", extra={**ctx, "code": code})
    return _json({"status": "recorded", "job_id": claim.job_id, "entry": entry}, 202)


@bp.after_request
def count(response: Response) -> Response:
    """Count every answer by APSIS code and outcome (the answer's status or error name)."""
    # The handler names its outcome; anything else (405, 413 from werkzeug...) by its status.
    outcome = g.get("callback_outcome") or f"http_{response.status_code}"
    metrics.callback_received(g.get("callback_code"), outcome)
    return response
