"""One background thread that POSTs due callbacks in time order, retrying 5xx and errors."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests

from sandbox.journal import Journal

log = logging.getLogger(__name__)

#: send_callback(url, json_body) -> the receiver's HTTP status; raises on connection errors.
SendCallback = Callable[[str, dict[str, Any]], int]


@dataclass
class Callback:
    """One callback to deliver, with what the journal needs to describe it."""

    url: str
    body: dict[str, Any]
    account: str
    export_key: str
    definition_id: str
    attempt: int = 1


@dataclass(order=True)
class _Due:
    at: float
    order: int
    callback: Callback = field(compare=False)


def http_sender(timeout: tuple[float, float]) -> SendCallback:
    """A sender using one requests.Session (connection reuse; used by the scheduler thread only)."""
    session = requests.Session()

    def send(url: str, body: dict[str, Any]) -> int:
        response = session.post(url, json=body, timeout=timeout, allow_redirects=False)
        response.close()
        return response.status_code

    return send


class CallbackScheduler:
    """A heap of due callbacks drained by one daemon thread (started on first use)."""

    def __init__(
        self,
        journal: Journal,
        send: SendCallback,
        *,
        retries: int,
        backoff: float,
    ) -> None:
        self.journal = journal
        self.retries = retries
        self.backoff = backoff
        self._send = send
        self._heap: list[_Due] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._in_flight = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    def schedule(self, callback: Callback, delay: float) -> None:
        """Deliver `callback` `delay` seconds from now."""
        with self._wake:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(
                    target=self._run, name="sandbox-callbacks", daemon=True
                )
                self._thread.start()
            heapq.heappush(
                self._heap, _Due(time.monotonic() + max(delay, 0.0), next(self._order), callback)
            )
            self._wake.notify_all()

    def pending(self) -> int:
        """Callbacks scheduled or being sent."""
        with self._wake:
            return len(self._heap) + self._in_flight

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Block until nothing is pending; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._wake:
            while self._heap or self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._wake.wait(remaining)
            return True

    def clear(self) -> None:
        """Forget every scheduled callback (a sandbox reset)."""
        with self._wake:
            self._heap.clear()
            self._wake.notify_all()

    def stop(self, timeout: float = 2.0) -> None:
        with self._wake:
            self._stopping = True
            self._heap.clear()
            self._wake.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping:
                    if self._heap and self._heap[0].at <= time.monotonic():
                        break
                    timeout = self._heap[0].at - time.monotonic() if self._heap else None
                    self._wake.wait(timeout)
                if self._stopping:
                    return
                due = heapq.heappop(self._heap)
                self._in_flight += 1
            try:
                self._deliver(due.callback)
            finally:
                with self._wake:
                    self._in_flight -= 1
                    self._wake.notify_all()

    def _deliver(self, callback: Callback) -> None:
        status: int | None
        try:
            status = self._send(callback.url, callback.body)
        except Exception as exc:  # any failure to deliver is a connection error to APSIS
            log.debug("callback to %s failed: %s", callback.url, exc)
            status = None
        self.journal.record(
            {
                "method": "POST",
                "path": urlsplit(callback.url).path,
                "url": callback.url,
                "kind": "callback",
                "status": status,
                "auth": False,
                "account": callback.account,
                "export_key": callback.export_key,
                "definition_id": callback.definition_id,
                "code": callback.body.get("code"),
                "attempt": callback.attempt,
            }
        )
        failed = status is None or status >= 500
        if failed and callback.attempt <= self.retries:
            retry = Callback(
                url=callback.url,
                body=callback.body,
                account=callback.account,
                export_key=callback.export_key,
                definition_id=callback.definition_id,
                attempt=callback.attempt + 1,
            )
            self.schedule(retry, self.backoff * callback.attempt)
