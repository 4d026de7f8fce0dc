"""A Flask endpoint that does nothing, served with the webhook's gunicorn settings: its floor.

Run: python -m bench.bare_app PORT [WORKERS] [THREADS] (bench/webhook_throughput starts it).
"""

from __future__ import annotations

import sys

from flask import Flask, Response

from bench.report import WEBHOOK_THREADS, WEBHOOK_WORKERS
from webhook.serve import gunicorn_options, run_gunicorn


def create_app() -> Flask:
    app = Flask("bare")

    @app.post("/callbacks/<token>")
    def receive(token: str) -> Response:
        return Response(b"", status=202)

    @app.get("/healthz")
    def healthz() -> Response:
        return Response(b"ok", status=200)

    return app


if __name__ == "__main__":
    port = int(sys.argv[1])
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else WEBHOOK_WORKERS
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else WEBHOOK_THREADS
    options = gunicorn_options(host="127.0.0.1", port=port, workers=workers, threads=threads)
    run_gunicorn(create_app(), options)
