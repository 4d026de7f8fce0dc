"""The Celery app (``celery -A worker worker``): settings, task modules and the inbox step."""

from __future__ import annotations

import os
import sys
from typing import Any

from celery import Celery, bootsteps, signals, signature

from worker.config import Settings, load_settings
from worker.errors import ConfigError
from worker.logs import configure_logging

#: Task modules, named as strings: worker/ never imports tasks/.
TASK_MODULES = ["tasks.export"]


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings; each overridable by its environment variable (see the README)."""
    queue = os.environ.get("CELERY_QUEUE", "apsis")
    return {
        "broker_url": settings.REDIS_URL,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": settings.CELERY_VISIBILITY_TIMEOUT},
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        # Acknowledge after the task ran, and requeue it if its process dies: every task
        # here is idempotent, so running twice is safe and losing one is not.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Nobody reads task results: the job record and the caller's chain carry them.
        "task_ignore_result": True,
        "task_default_queue": queue,
        "task_routes": {"apsis.*": {"queue": queue}},
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_track_started": False,
    }


def _settings_or_exit() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        sys.stderr.write(f"apsis-export: {exc}\n")
        raise SystemExit(2) from None


SETTINGS = _settings_or_exit()
app = Celery("apsis-export", include=TASK_MODULES)
app.conf.update(celery_config(SETTINGS))


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    """Our JSON lines in every worker process (main and pool), instead of Celery's text."""
    configure_logging(SETTINGS.LOG_LEVEL)


def send_task(name: str, args: list[Any]) -> None:
    """Dispatch one of our own tasks by name."""
    app.send_task(name, args=args)


def send_task_later(name: str, args: list[Any], countdown: float) -> None:
    """Dispatch one of our tasks after ``countdown`` s (always well under the visibility
    timeout: callers cap their delays at half of it)."""
    app.send_task(name, args=args, countdown=countdown if countdown > 0 else None)


def send_chain(stored: dict[str, Any], result: dict[str, Any]) -> None:
    """Resume a caller's chain (and ``link`` callbacks) the way Celery itself would."""
    chain = list(stored.get("chain") or [])
    if chain:
        first = signature(chain.pop(), app=app)
        first.apply_async((result,), chain=chain or None)
    for link in stored.get("link") or []:
        signature(link, app=app).apply_async((result,))


def _sweep(rt: Any, try_sweep: Any) -> None:
    try_sweep(rt, send_task, send_chain)


class InboxStep(bootsteps.StartStopStep):
    """Runs the inbox consumer (and the periodic sweep) in the worker's main process."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.consumer: Any = None

    def start(self, parent: Any) -> None:
        if os.environ.get("APSIS_INBOX_CONSUMER", "1") == "0":
            return
        from worker.consumer import InboxConsumer
        from worker.runtime import get_runtime
        from worker.watchdog import try_sweep

        self.consumer = InboxConsumer(
            get_runtime,
            send_task,
            on_tick=lambda rt: _sweep(rt, try_sweep),
        )
        self.consumer.start()

    def stop(self, parent: Any) -> None:
        if self.consumer is not None:
            self.consumer.stop()


app.steps["worker"].add(InboxStep)
