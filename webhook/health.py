"""GET /healthz (the process lives and answers) and GET /readyz (Redis and storage answer)."""

from __future__ import annotations

import redis
from flask import Blueprint, Flask, Response, current_app, jsonify

from webhook.resources import resources
from worker.deliverable.storage import Storage
from worker.errors import ExportError

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify(status="ok")


def _storage(app: Flask) -> Storage:
    """The store the workers write to, opened once per process (the probe only lists it)."""
    found = app.extensions.get("apsis.storage")
    if found is None:
        found = app.extensions["apsis.storage"] = Storage(resources(app).settings.STORAGE_URL)
    store: Storage = found
    return store


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """200 when Redis and storage answer; 503 naming what failed (never a secret)."""
    checks: dict[str, str] = {}
    try:
        resources(current_app).redis.ping()
        checks["redis"] = "ok"
    except redis.RedisError as exc:
        checks["redis"] = f"unavailable ({type(exc).__name__})"
    try:
        _storage(current_app).check()
        checks["storage"] = "ok"
    except ExportError as exc:
        checks["storage"] = f"unavailable ({exc})"
    ready = all(value == "ok" for value in checks.values())
    return jsonify(status="ok" if ready else "unavailable", checks=checks), 200 if ready else 503
