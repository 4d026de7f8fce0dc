"""The webhook's floors, served with its gunicorn settings: a Flask endpoint that does
nothing, and one that makes only the webhook's one Redis write.

Run: python -m bench.bare_app PORT [WORKERS] [THREADS] [--write] (bench/webhook_throughput
starts both). ``--write`` (the webhook's settings from the environment): each request reads
its body and records a code-100 callback for the job its path names, through the inbox the
webhook's own app factory builds (the same script on the same kind of connection), then
answers 202 with no body: no token check, no validation, no metrics. The webhook against this
floor is what its own code costs beyond the write a callback must make before its 2xx.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from flask import Flask, Response, request

from bench.report import WEBHOOK_THREADS, WEBHOOK_WORKERS
from webhook.app import create_app as create_webhook_app
from webhook.callbacks import FLOOD_LIMIT, FLOOD_WINDOW_SECONDS
from webhook.resources import resources
from webhook.serve import gunicorn_options, run_gunicorn


def create_app(*, write: bool = False) -> Flask:
    app = Flask("bare")
    record = _writer() if write else None

    @app.post("/callbacks/<token>")
    def receive(token: str) -> Response:
        if record is not None:
            request.environ["wsgi.input"].read(request.content_length or 0)  # as the webhook
            if record(token) != "recorded":  # the bench counts it as a failure
                return Response(b"", status=500)
        return Response(b"", status=202)

    @app.get("/healthz")
    def healthz() -> Response:
        return Response(b"ok", status=200)

    return app


def _writer() -> Callable[[str], str]:
    # The webhook's own inbox and job store (its client, timeout and replica setting).
    res = resources(create_webhook_app())
    inbox, jobs = res.inbox, res.jobs

    def record(token: str) -> str:
        job_id = token.rsplit(".", 3)[0]  # not verified: the floor is the write alone
        outcome, _entry = inbox.record(
            job_key=jobs.key(job_id),
            job_id=job_id,
            attempt=1,
            code=100,
            message="Callback verified",
            flood_limit=FLOOD_LIMIT,
            flood_window=FLOOD_WINDOW_SECONDS,
        )
        return outcome

    return record


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--write"]
    port = int(args[0])
    workers = int(args[1]) if len(args) > 1 else WEBHOOK_WORKERS
    threads = int(args[2]) if len(args) > 2 else WEBHOOK_THREADS
    options = gunicorn_options(host="127.0.0.1", port=port, workers=workers, threads=threads)
    run_gunicorn(create_app(write="--write" in sys.argv), options)
