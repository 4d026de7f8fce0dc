"""The Celery app (``celery -A worker worker``): settings, task modules and the inbox step."""

from __future__ import annotations

import os
import sys
from typing import Any

from celery import Celery, bootsteps, signals, signature

from worker.config import Settings, load_settings
from worker.errors import ConfigError
from worker.queue import inflight, nodes
from worker.queue.inflight import celery_queue
from worker.telemetry.logs import configure_logging

#: Task modules, named as strings: worker/ never imports tasks/.
TASK_MODULES = ["tasks.export", "tasks.maintenance"]
#: More task modules to load, comma-separated (e.g. ``bench.tasks`` for the benchmarks).
EXTRA_INCLUDE_ENV = "CELERY_EXTRA_INCLUDE"
#: Publishing through a Sentinel failover: up to 40 tries, 0.5 s apart (about 20 s).
FAILOVER_PUBLISH_RETRY = {
    "max_retries": 40,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 0.5,
}


def task_modules() -> list[str]:
    """TASK_MODULES plus any named in CELERY_EXTRA_INCLUDE."""
    extra = os.environ.get(EXTRA_INCLUDE_ENV, "")
    return TASK_MODULES + [name.strip() for name in extra.split(",") if name.strip()]


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings; each overridable by its environment variable (see the README)."""
    queue = celery_queue()
    redis_at = settings.redis_connection()
    sentinel = bool(redis_at.sentinels)
    return {
        # The URL without TLS query options, which kombu would let replace broker_use_ssl;
        # through a Sentinel group, one sentinel:// URL per sentinel.
        "broker_url": redis_at.broker_url(),
        # TLS as for every other client; for rediss:// always set, so kombu never falls
        # back to not checking the server's certificate.
        "broker_use_ssl": redis_at.broker_ssl(),
        # kombu's Redis transport, taking messages so that a lost connection loses none
        # (its Sentinel flavour: the same channel, on whichever server is the primary).
        "broker_transport": "worker.queue.broker:"
        + ("SentinelTransport" if sentinel else "Transport"),
        "broker_connection_retry_on_startup": True,
        # Through a failover a publish meets no primary for a few seconds (the sentinels'
        # down-after-milliseconds plus the election): retry it for up to ~20 s rather than
        # kombu's 3 tries in 0.4 s, which would fail the step that sends it.
        **({"task_publish_retry_policy": FAILOVER_PUBLISH_RETRY} if sentinel else {}),
        "broker_transport_options": {
            **redis_at.broker_transport_options(),
            "visibility_timeout": settings.CELERY_VISIBILITY_TIMEOUT,
            # Look for unacknowledged messages past the visibility timeout every 10 s, not
            # every 10th time (100 s): a killed worker's tasks come back that much sooner.
            "unacked_restore_throttle": 1,
            # A consumer waiting on a connection Redis dropped finds out within about
            # 2 x 5 s + 1 s instead of 51 s (kombu's default of 25 s).
            "health_check_interval": 5,
        },
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
        # Remote control (celery inspect/control) rides on auto-delete pidbox queues whose
        # close after a lost Redis connection crashes the worker in kombu's Redis transport
        # ("'NoneType' object has no attribute 'hostname'", kombu#582): seen in our fault
        # suite on a Redis restart. Off by default; the job store, /metrics and
        # `apsis-export health` tell what a node is doing. CELERY_REMOTE_CONTROL=1 turns it on.
        "worker_enable_remote_control": os.environ.get("CELERY_REMOTE_CONTROL", "0") == "1",
        "task_track_started": False,
    }


def _settings_or_exit() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        sys.stderr.write(f"apsis-export: {exc}\n")
        raise SystemExit(2) from None


SETTINGS = _settings_or_exit()
app = Celery("apsis-export", include=task_modules())
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
    def recover_messages() -> int:
        # In flight since the last sweep, and taken by a node that stopped beating.
        return inflight.recover(rt.redis, celery_queue()) + nodes.restore_lost(rt.redis)

    try_sweep(rt, send_task, send_chain, recover_messages=recover_messages)


def _forks_its_pool(parent: Any) -> bool:
    """Whether this worker runs its tasks in forked children (prefork, the default), not in
    this process (solo, threads)."""
    from celery.concurrency.prefork import TaskPool

    return isinstance(getattr(parent, "pool", None), TaskPool)


class InboxStep(bootsteps.StartStopStep):
    """Runs the inbox consumer (and the periodic sweep) in the worker's main process."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.consumer: Any = None
        self.heartbeat: nodes.NodeHeartbeat | None = None
        self.feeder: Any = None
        self.download_feeder: Any = None

    def start(self, parent: Any) -> None:
        if _forks_its_pool(parent):
            # Pool children are forked from this process at any time (a crash, an OOM kill,
            # max_tasks_per_child): it must never start obstore's runtime, or every child
            # forked afterwards hangs on its first upload. The steps below hand storage
            # work to the pool as tasks; the guard makes any slip an error, not a hang.
            from worker.deliverable.storage import forbid_io_in_this_process

            forbid_io_in_this_process()
        if os.environ.get("APSIS_INBOX_CONSUMER", "1") == "0":
            return
        from worker.flow.consumer import InboxConsumer
        from worker.flow.runtime import get_runtime
        from worker.flow.watchdog import try_sweep

        # Beats until this process ends (never stopped: a warm shutdown still runs tasks
        # whose messages are this node's); claims name this node once it has beaten.
        self.heartbeat = nodes.NodeHeartbeat(lambda: get_runtime().redis).start()
        self.consumer = InboxConsumer(
            get_runtime,
            send_task,
            on_tick=lambda rt: _sweep(rt, try_sweep),
        )
        self.consumer.start()
        from worker.flow.feeder import Feeder

        self.feeder = Feeder(get_runtime, send_task_later)
        self.feeder.start()
        self.download_feeder = Feeder(get_runtime, send_task_later, downloads=True)
        self.download_feeder.start()

    def stop(self, parent: Any) -> None:
        if self.consumer is not None:
            self.consumer.stop()
        for feeder in (self.feeder, self.download_feeder):
            if feeder is not None:
                feeder.stop()


app.steps["worker"].add(InboxStep)


@signals.worker_init.connect
def _metrics_multiprocess(**_: Any) -> None:
    """Before the pool forks: every process of this node records into one metrics dir."""
    from worker.telemetry import metrics

    metrics.prepare_multiprocess("worker")


@signals.worker_process_shutdown.connect
def _metrics_process_dead(pid: int | None = None, **_: Any) -> None:
    from worker.telemetry import metrics

    metrics.process_exited(pid or os.getpid())


class MetricsStep(bootsteps.StartStopStep):
    """Serves this node's /metrics on WORKER_METRICS_PORT from the main process (0: off)."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.server: Any = None

    def start(self, parent: Any) -> None:
        if SETTINGS.WORKER_METRICS_PORT == 0:
            return
        from worker.flow.runtime import get_runtime
        from worker.ops.gauges import MetricsServer

        self.server = MetricsServer(
            SETTINGS.WORKER_METRICS_PORT, lambda: get_runtime().redis, host="0.0.0.0"
        )
        self.server.start()

    def stop(self, parent: Any) -> None:
        if self.server is not None:
            self.server.stop()


app.steps["worker"].add(MetricsStep)
