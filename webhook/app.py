"""The webhook's app factory: settings, the Redis-backed resources, blueprints, JSON errors."""

from __future__ import annotations

import redis
from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from webhook import callbacks, health, metrics, status
from webhook.resources import WebhookResources
from worker.config import Settings, load_settings
from worker.flow.runtime import redis_client, replica_ack
from worker.model.inbox import Inbox
from worker.model.jobs import JobStore

#: Seconds a Redis call from the webhook may take before it answers 503 (APSIS retries).
WEBHOOK_REDIS_TIMEOUT = 2.0


def create_app(settings: Settings | None = None) -> Flask:
    """Build the webhook; ``settings`` default to the environment's."""
    settings = (settings or load_settings()).require("CALLBACK_SECRET")
    app = Flask("webhook")
    # Werkzeug refuses larger bodies with 413 before reading them (Content-Length or not).
    app.config["MAX_CONTENT_LENGTH"] = settings.CALLBACK_MAX_BYTES
    client = redis_client(settings.redis_connection(), timeout=WEBHOOK_REDIS_TIMEOUT)
    # A callback is answered 2xx only once the replicas asked for hold it (else 503).
    inbox = Inbox(client, replicas=replica_ack(settings))
    app.extensions["apsis"] = WebhookResources(
        settings=settings, redis=client, jobs=JobStore(client), inbox=inbox
    )

    app.register_blueprint(callbacks.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(status.bp)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        response = jsonify(error=(exc.name or "error").lower(), detail=exc.description)
        # Keep the exception's own headers (405 must name the allowed methods in Allow).
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response, status

    @app.errorhandler(redis.RedisError)
    def redis_down(exc: redis.RedisError) -> tuple[Response, int]:
        # Not recorded: say so, so APSIS (or any caller) retries rather than believing us.
        app.logger.warning("redis unavailable: %s", type(exc).__name__)
        response = jsonify(error="unavailable", detail="callback store unavailable; retry")
        response.headers["Retry-After"] = "5"
        return response, 503

    return app
