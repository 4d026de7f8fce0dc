"""Helpers for the fault-injection suite: which key gets which fault, and the sandbox's hands.

The sandbox runs in the test's own process (LocalStack starts it in a thread), so the suite
can do two things its HTTP control API cannot do without side effects:

- make a *callback* fault happen once: ``drop_ready`` and ``failure_code`` apply to every
  export of a key, so :class:`OnceFaults` clears them on the key's spec as soon as the sandbox
  accepted that key's first export (``PUT /_sandbox/faults`` would also reset the one-shot
  download faults and restore consumed error lists);
- expire every issued token at a chosen moment (what ``expire_tokens`` does when a spec is
  set, without replacing the fault configuration).
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import redis

from sandbox.state import SandboxState
from worker.deliverable.storage import Storage
from worker.queue.nodes import CLAIMING_NODES, claims_key

#: Bytes of the export file served to the "big" keys (kills may land mid-download/parse/upload).
BIG_FILE_BYTES = 12_000_000


@dataclass(frozen=True)
class FaultKind:
    """One kind of misbehaviour: its sandbox spec and what the job must end as."""

    name: str
    spec: dict[str, Any]
    keys: int
    #: The fault never goes away: the job must end failed, with a reason.
    permanent: bool = False
    #: Spec fields cleared once the sandbox accepted the key's first export.
    once: tuple[str, ...] = ()
    #: Callback faults that must never cause a second download (checked strictly).
    strict_one_download: bool = False


KINDS: tuple[FaultKind, ...] = (
    FaultKind("none", {}, 50),
    FaultKind("duplicate", {"duplicate": 2}, 25, strict_one_download=True),
    FaultKind("reorder", {"reorder": True}, 25, strict_one_download=True),
    FaultKind("duplicate+reorder", {"duplicate": 1, "reorder": True}, 15, strict_one_download=True),
    FaultKind("drop_verify", {"drop_verify": True}, 15, strict_one_download=True),
    FaultKind("drop_ready_once", {"drop_ready": True}, 20, once=("drop_ready",)),
    FaultKind("drop_ready_always", {"drop_ready": True}, 8, permanent=True),
    FaultKind("failure_code_once", {"failure_code": 500}, 15, once=("failure_code",)),
    FaultKind("failure_code_always", {"failure_code": 410}, 8, permanent=True),
    FaultKind(
        "export_429_retry_after",
        {"export_errors": [{"status": 429, "retry_after": 1}] * 3},
        15,
    ),
    FaultKind(
        "export_429_no_retry_after",
        {"export_errors": [{"status": 429, "retry_after": None}] * 2},
        15,
    ),
    FaultKind("export_5xx", {"export_errors": [500, 503, 502]}, 15),
    FaultKind(
        "download_429",
        {
            "download_errors": [
                {"status": 429, "retry_after": 1},
                {"status": 429, "retry_after": None},
            ]
        },
        15,
    ),
    FaultKind("download_5xx", {"download_errors": [500, 503]}, 15),
    FaultKind("truncated_once", {"truncate_at": 1500, "fault_times": 1}, 15),
    FaultKind("corrupt_once", {"corrupt": True, "fault_times": 1}, 15),
    FaultKind("big_file", {"file_size": BIG_FILE_BYTES}, 14),
)


def assign_kinds(seed: int = 5) -> list[FaultKind]:
    """One kind per export, shuffled deterministically (so every wave mixes the kinds)."""
    kinds = [kind for kind in KINDS for _ in range(kind.keys)]
    random.Random(seed).shuffle(kinds)
    return kinds


def fault_config(keys: dict[str, FaultKind]) -> dict[str, Any]:
    return {"keys": {key: kind.spec for key, kind in keys.items() if kind.spec}}


class OnceFaults:
    """Clears a key's callback fault right after the sandbox accepted the key's first export."""

    def __init__(self, state: SandboxState, once: dict[str, tuple[str, ...]]) -> None:
        self._state = state
        self._pending = dict(once)
        self.cleared: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="once-faults", daemon=True)

    def start(self) -> OnceFaults:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        cursor = 0
        while self._pending and not self._stop.wait(0.05):
            for entry in self._state.journal.entries(since=cursor, kind="export"):
                cursor = max(cursor, int(entry["seq"]))
                key = entry.get("export_key")
                if entry.get("status") == 202 and key in self._pending:
                    self._clear(key, self._pending.pop(key))

    def _clear(self, key: str, names: tuple[str, ...]) -> None:
        faults = self._state.faults
        with faults._lock:  # the sandbox's own lock: no request sees a half-changed spec
            spec = faults._config.keys.get(key)
            if spec is not None:
                for name in names:
                    setattr(spec, name, None)
        self.cleared[key] = time.time()


def expire_issued_tokens(state: SandboxState) -> int:
    """Treat every token issued so far as expired (APSIS answers 401/403); returns how many."""
    with state._lock:
        fresh = len(state._issued - state._revoked)
        state._revoked |= state._issued
    return fresh


def leased_jobs(client: redis.Redis) -> set[str]:
    """Jobs some worker is fetching/parsing/storing right now (their lease is held)."""
    found: set[str] = set()
    for raw in client.scan_iter(match="apsis:lease:*", count=1000):
        found.add(raw.decode().removeprefix("apsis:lease:"))
    return found


def fetching_worker(client: redis.Redis, job_id: str) -> int | None:
    """The pid of the worker node (its main process, as LocalStack started it) whose pool
    runs the job's fetch: the node that claimed the job's unacknowledged
    ``apsis.fetch_export`` message (``apsis:claims:<node>``, the node id ``host-pid-hex``)."""
    unacked: dict[bytes, bytes] = client.hgetall("unacked")  # type: ignore[assignment]
    tags = [
        tag
        for tag, raw in unacked.items()
        if (headers := json.loads(raw)[0].get("headers") or {}).get("task") == "apsis.fetch_export"
        and job_id in str(headers.get("argsrepr"))
    ]
    nodes: list[bytes] = client.hkeys(CLAIMING_NODES)  # type: ignore[assignment]
    for node in nodes:
        for tag in tags:
            if client.zscore(claims_key(node.decode()), tag) is not None:
                return int(node.decode().rsplit("-", 2)[1])
    return None


def stored_problems(storage: Storage, job_id: str, served_sha256: set[str]) -> list[str]:
    """What is wrong with a done job's objects: the stored source is not a file the sandbox
    served complete for it (``served_sha256``), an object differs from its manifest entry,
    or the job's folder holds objects the manifest does not name. Empty: stored once, right."""
    found: list[str] = []
    manifest = json.loads(storage.get_bytes(f"jobs/{job_id}/manifest.json"))
    if manifest.get("state") != "done":
        return [f"manifest says {manifest.get('state')}"]
    if manifest["source"]["sha256"] not in served_sha256:
        found.append("stored source is not what the sandbox served")
    entries = [manifest["source"], *manifest["profiles"], *manifest.get("reports", {}).values()]
    if manifest.get("package"):
        entries.append(manifest["package"])
    named = {entry["object"]: entry["sha256"] for entry in entries}
    for path, digest in named.items():
        if hashlib.sha256(storage.get_bytes(path)).hexdigest() != digest:
            found.append(f"{path} differs from its manifest entry")
    listed = set(storage.list(f"jobs/{job_id}")) - {f"jobs/{job_id}/manifest.json"}
    if listed != set(named):
        found.append(f"objects not in the manifest or missing: {sorted(listed ^ set(named))}")
    return found


def consumer_pending(client: redis.Redis, stream: str, group: str) -> dict[str, int]:
    """Entries read and not yet acknowledged, per consumer of the inbox group."""
    summary: Any = client.xpending(stream, group)
    return {
        (c["name"].decode() if isinstance(c["name"], bytes) else str(c["name"])): int(c["pending"])
        for c in summary.get("consumers") or []
    }


def count_by(items: list[dict[str, Any]], *names: str) -> Counter[tuple[Any, ...]]:
    return Counter(tuple(item.get(name) for name in names) for item in items)
