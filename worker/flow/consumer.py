"""The inbox consumer: a thread in each worker's main process that applies callbacks.

No extra process to deploy and none that can stop everything: every worker node reads the
stream through the same consumer group, and any of them reclaims what a dead one left.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import redis

from worker.flow.pipeline import Dispatch, apply_callback
from worker.flow.runtime import Runtime
from worker.model.inbox import Callback
from worker.telemetry import metrics

log = logging.getLogger("apsis.inbox")

#: Milliseconds one read blocks waiting for new callbacks (also how fast stop() is noticed).
BLOCK_MS = 1000
#: Entries read at once.
BATCH = 100
#: Seconds between two passes reclaiming entries a dead consumer left pending (and two
#: chances to run the watchdog sweep, which its own lock spaces to WATCHDOG_INTERVAL).
RECLAIM_EVERY = 2.0
#: Seconds to wait after Redis errors before reading again.
ERROR_PAUSE = 1.0
#: Seconds between two heartbeats (``apsis-export health`` reads them; see Inbox.beat).
HEARTBEAT_EVERY = 5.0


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class InboxConsumer:
    """Reads the inbox, applies each callback, acknowledges after the transition."""

    def __init__(
        self,
        runtime: Callable[[], Runtime],
        dispatch: Dispatch,
        *,
        name: str | None = None,
        on_tick: Callable[[Runtime], None] | None = None,
    ) -> None:
        self._runtime = runtime
        self._dispatch = dispatch
        self.name = name or consumer_name()
        self._on_tick = on_tick
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.processed = 0

    def handle(self, rt: Runtime, callback: Callback) -> str:
        try:
            outcome = apply_callback(rt, callback, self._dispatch)
        except Exception:
            metrics.callback_applied(callback.code, "error")
            raise
        metrics.callback_applied(callback.code, outcome)
        rt.inbox.ack(callback.entry_id)
        self.processed += 1
        return outcome

    def poll_once(self, rt: Runtime, *, block_ms: int = BLOCK_MS, reclaim: bool = False) -> int:
        """One read (and, if asked, one reclaim pass); returns how many entries were handled."""
        batch: list[Callback] = []
        if reclaim:
            batch += rt.inbox.reclaim(self.name, min_idle=rt.settings.INBOX_RECLAIM_AFTER)
        batch += rt.inbox.read(self.name, count=BATCH, block_ms=block_ms)
        for callback in batch:
            try:
                self.handle(rt, callback)
            except redis.RedisError:
                raise
            except Exception:
                # Left pending: reclaimed and retried later; the rest of the batch goes on.
                log.exception("callback could not be applied", extra={"job_id": callback.job_id})
        return len(batch)

    def heartbeat(self, rt: Runtime) -> None:
        """Say this consumer is alive (``apsis-export health`` and the gauges read it)."""
        rt.inbox.beat(self.name, time.time())

    def run(self) -> None:
        last_reclaim = 0.0
        last_beat = 0.0
        while not self._stop.is_set():
            try:
                rt = self._runtime()
                now = time.monotonic()
                if now - last_beat >= HEARTBEAT_EVERY:
                    self.heartbeat(rt)
                    last_beat = now
                reclaim = now - last_reclaim >= RECLAIM_EVERY
                if reclaim:
                    last_reclaim = now
                    if self._on_tick is not None:
                        self._on_tick(rt)
                self.poll_once(rt, reclaim=reclaim)
            except redis.RedisError as exc:
                log.warning("inbox unreachable; retrying", extra={"reason": type(exc).__name__})
                self._stop.wait(ERROR_PAUSE)
            except Exception:
                log.exception("inbox consumer error")
                self._stop.wait(ERROR_PAUSE)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="apsis-inbox", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
