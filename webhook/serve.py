"""Serve the webhook with gunicorn (``apsis-export webhook``)."""

from __future__ import annotations

from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from webhook.app import create_app
from worker.config import Settings
from worker.telemetry import metrics


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    def __init__(self, app: Flask, options: dict[str, Any]) -> None:
        self._app = app
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return self._app


def gunicorn_options(*, host: str, port: int, workers: int, threads: int) -> dict[str, Any]:
    """The server settings (also used by bench/ to serve its bare endpoint the same way)."""
    return {
        "bind": f"{host}:{port}",
        "workers": workers,
        "threads": threads,
        "worker_class": "gthread",
        # The webhook answers in milliseconds; a slow client must not hold a thread long.
        "timeout": 30,
        "keepalive": 5,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "warning",
    }


def run_gunicorn(app: Flask, options: dict[str, Any]) -> None:
    """Serve ``app`` with gunicorn in the foreground."""
    _Gunicorn(app, options).run()


def serve(
    settings: Settings,
    *,
    host: str = "0.0.0.0",
    port: int = 8080,
    workers: int = 2,
    threads: int = 4,
) -> None:
    """Run gunicorn in the foreground; the app is built once, before the workers fork."""
    # Before anything records a metric: the gunicorn workers share one metrics directory.
    metrics.prepare_multiprocess("webhook")
    app = create_app(settings)
    options = gunicorn_options(host=host, port=port, workers=workers, threads=threads)
    options["child_exit"] = _child_exit
    run_gunicorn(app, options)


def _child_exit(server: Any, worker: Any) -> None:
    """gunicorn's hook in the master when a worker exits: drop its live metrics."""
    metrics.process_exited(worker.pid)
