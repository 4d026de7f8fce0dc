"""A thread-safe, in-memory log of every API request and callback the sandbox handled."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

#: Entry kinds. Control-API requests (/_sandbox/...) are deliberately not journaled, so
#: tests can count API traffic without filtering out their own bookkeeping.
KINDS = ("token", "export", "download", "callback", "other")

Entry = dict[str, Any]


class Journal:
    """Append-only list of JSON-serialisable entries, each with an increasing `seq`."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._entries: list[Entry] = []
        self._seq = 0

    def record(self, entry: Entry) -> Entry:
        """Stamp `entry` with seq and ts (unless set), store it and return it."""
        with self._changed:
            self._seq += 1
            entry["seq"] = self._seq
            entry.setdefault("ts", time.time())
            self._entries.append(entry)
            self._changed.notify_all()
        return entry

    def entries(self, *, since: int | None = None, kind: str | None = None) -> list[Entry]:
        """Copies of the entries with seq > since, optionally of one kind only."""
        with self._changed:
            return [
                dict(e)
                for e in self._entries
                if (since is None or e["seq"] > since) and (kind is None or e["kind"] == kind)
            ]

    def clear(self) -> None:
        # seq keeps counting so a client's `since` cursor stays meaningful across clears.
        with self._changed:
            self._entries.clear()

    def wait_for(
        self, predicate: Callable[[list[Entry]], bool], *, timeout: float = 5.0
    ) -> list[Entry]:
        """Block until predicate(entries) holds; return the entries. TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate([dict(e) for e in self._entries]):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("journal condition not met in time")
                self._changed.wait(remaining)
            return [dict(e) for e in self._entries]
