"""GET /status: the pool at a glance, as plain server-rendered HTML behind a bearer token.

Off (404) unless STATUS_TOKEN is set. Shows job and batch ids, states, counts and failure
reasons, never an export key or a caller's reference (either may be personal data).
"""

from __future__ import annotations

import hmac
import importlib.resources
import re
import time
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, abort, current_app, render_template_string, request
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import Unauthorized

from webhook.resources import resources
from worker.model.batch_store import BatchStore
from worker.model.inbox import Inbox
from worker.model.jobs import JobStore
from worker.model.line import FETCH_PREFIX, PREFIX, DispatchLine
from worker.ops.gauges import DUE_SOON_SECONDS
from worker.telemetry import metrics

bp = Blueprint("status", __name__)

#: Rows shown per table.
MAX_BATCHES = 50
MAX_FAILURES = 20
MAX_DEADLINES = 10
#: Longest failure reason shown, in characters.
MAX_REASON_CHARS = 240
#: Seconds between two automatic reloads of the page (a meta refresh: no JavaScript).
REFRESH_SECONDS = 15
#: APSIS's free text after its failure code may name the data subject: never shown.
_APSIS_TEXT = re.compile(r"(APSIS reported failure code \d+): .*", re.DOTALL)


def public_reason(reason: str) -> str:
    """A failure reason fit for the page: APSIS's own message withheld, length capped."""
    shown = _APSIS_TEXT.sub(r"\1 (message withheld)", reason)
    return shown if len(shown) <= MAX_REASON_CHARS else shown[: MAX_REASON_CHARS - 1] + "…"


def _authorized(expected: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    return hmac.compare_digest(token.strip().encode(), expected.encode())


@dataclass(frozen=True)
class BatchRow:
    batch_id: str
    state: str
    total: int
    done: int
    failed: int
    in_flight: int
    waiting: int
    age: str

    def percent(self, part: int) -> float:
        return round(100.0 * part / self.total, 2) if self.total else 0.0


def _ago(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else ("" if raw is None else str(raw))


def gather(client: Any, now: float) -> dict[str, Any]:
    """Everything the page shows, read from Redis through the stores."""
    jobs = JobStore(client)
    counts = jobs.counts()
    by_state = [(state, max(counts.get(state, 0), 0)) for state in metrics.JOB_STATES]

    store = BatchStore(client, jobs)
    batches = [
        BatchRow(
            batch_id=batch.batch_id,
            state=batch.state,
            total=batch.total,
            done=batch.done,
            failed=batch.failed,
            in_flight=max(batch.submitted - batch.done - batch.failed, 0),
            waiting=batch.waiting,
            age=_ago(now - batch.created_at),
        )
        for batch in store.many(store.running_ids(MAX_BATCHES, newest_first=True))
        if batch.total
    ]

    failures = []
    for job_id in jobs.recent_failures(MAX_FAILURES):
        job = jobs.find(job_id)
        failures.append(
            {
                "job_id": job_id,
                "batch_id": (job.batch_id or "") if job else "",
                "ago": _ago(now - job.updated_at) if job else "",
                "reason": public_reason(job.error) if job and job.error else "(record expired)",
            }
        )

    deadlines = []
    for job_id, at in jobs.nearest_deadlines(MAX_DEADLINES):
        job = jobs.find(job_id)
        left = at - now
        deadlines.append(
            {
                "job_id": job_id,
                "state": job.state.value if job else "",
                "left": ("overdue by " if left < 0 else "") + _ago(left),
                "urgent": left < DUE_SOON_SECONDS,
            }
        )

    lines = [
        {
            "line": name,
            "account": row.account,
            "lane": row.lane,
            "waiting": row.waiting,
            "oldest": _ago(now - row.oldest_since) if row.oldest_since else "",
        }
        for name, prefix in (("requests", PREFIX), ("downloads", FETCH_PREFIX))
        for row in DispatchLine(client, prefix=prefix).summary()
        if row.waiting
    ]

    inbox = Inbox(client)
    oldest = jobs.oldest_waiting()
    return {
        "now": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)),
        "by_state": by_state,
        "batches": batches,
        "failures": failures,
        "deadlines": deadlines,
        "lines": lines,
        "backlog": inbox.backlog(),
        "consumers": inbox.live_consumer_count(now),
        "oldest_waiting": _ago(now - oldest) if oldest is not None else "none waiting",
        "refresh": REFRESH_SECONDS,
    }


def _template() -> str:
    return importlib.resources.files("webhook").joinpath("status.html").read_text("utf-8")


@bp.get("/status")
def status() -> Response:
    expected = resources(current_app).settings.STATUS_TOKEN
    if not expected:
        abort(404)
    if not _authorized(expected):
        raise Unauthorized(
            description="send Authorization: Bearer <STATUS_TOKEN>",
            www_authenticate=WWWAuthenticate("bearer", {"realm": "status"}),
        )
    # render_template_string autoescapes every value: ids and reasons are text, not markup.
    page = render_template_string(_template(), **gather(resources(current_app).redis, time.time()))
    response = Response(page, mimetype="text/html")
    response.headers["Cache-Control"] = "no-store"
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response
