"""The bearer token never leaves the APSIS origin, whatever a callback or APSIS says.

Each test runs the real stack (sandbox, gunicorn webhook, celery worker) next to an
"attacker" HTTP listener that records every request it gets.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from e2e_support import StackFactory, wait_final

from worker.apsis.client import CONNECT_TIMEOUT
from worker.cli.stack import LocalStack
from worker.deliverable.storage import Storage
from worker.model import callback_token
from worker.model.jobs import Job, JobStore, State

pytestmark = pytest.mark.integration

#: Seconds a refused job may take to fail once APSIS said "ready" (far below CONNECT_TIMEOUT).
REFUSAL_WITHIN = 1.5


@dataclass
class Listener:
    """An HTTP server that answers 200 with a valid-looking export and records each request."""

    url: str
    seen: list[dict[str, Any]] = field(default_factory=list)

    def authorized(self) -> list[dict[str, Any]]:
        return [r for r in self.seen if "authorization" in r["headers"]]


def _listen(host: str) -> Iterator[Listener]:
    listener = Listener(url="")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            with lock:
                listener.seen.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                    }
                )
            body = json.dumps({"profiles": {}, "metadata": {"sections": {}}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_HEAD = _record

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, 0), Handler)
    listener.url = f"http://{host}:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield listener
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def attacker() -> Iterator[Listener]:
    """Another loopback address: what "some other host" looks like on one machine."""
    yield from _listen("127.0.0.2")


@pytest.fixture
def neighbour() -> Iterator[Listener]:
    """The sandbox's own host, another port."""
    yield from _listen("127.0.0.1")


def _faults(stack: LocalStack, export_key: str, spec: dict[str, Any]) -> None:
    stack.sandbox_put("/_sandbox/faults", {"keys": {export_key: spec}})


def _downloads(stack: LocalStack) -> list[dict[str, Any]]:
    return [e for e in stack.journal() if e["kind"] == "download"]


def _settled_downloads(stack: LocalStack, at_least: int) -> list[dict[str, Any]]:
    """The download entries once ``at_least`` are in: a streamed download is journaled when
    the sandbox closes its body, which can be a moment after the worker hung up."""
    deadline = time.monotonic() + 10
    while len(_downloads(stack)) < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # a retry, if there were one, would be journaled by now
    return _downloads(stack)


def _worker_log_lines(stack: LocalStack) -> list[dict[str, Any]]:
    lines = []
    for path in sorted(Path(stack.log_dir).glob("worker-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
    return lines


def _refusals(stack: LocalStack, job_id: str) -> list[dict[str, Any]]:
    return [
        line
        for line in _worker_log_lines(stack)
        if line.get("event") == "download_refused" and line.get("job_id") == job_id
    ]


def _seconds_from_ready_to_failed(jobs: JobStore, job: Job) -> float:
    history = jobs.history(job.job_id)
    ready = next(h["at"] for h in history if h["state"] == "ready")
    failed = next(h["at"] for h in history if h["state"] == "failed")
    return float(failed - ready)


def _assert_nothing_stored(stack: LocalStack, job_id: str) -> None:
    """A failed job leaves its failure manifest and nothing else: no export, no profiles."""
    storage = Storage(stack.env["STORAGE_URL"])
    assert storage.list(f"jobs/{job_id}") == [f"jobs/{job_id}/manifest.json"]
    manifest = json.loads(storage.get_bytes(f"jobs/{job_id}/manifest.json"))
    assert manifest["state"] == "failed"


def test_download_url_on_another_host_is_refused_and_gets_no_token(
    make_stack: StackFactory, redis_db: redis.Redis, attacker: Listener
) -> None:
    stack = make_stack()
    key = "victim-host@example.com"
    _faults(stack, key, {"download_host": attacker.url})
    jobs = JobStore(redis_db)
    (job,) = wait_final(jobs, [stack.submit(key)], timeout=30)

    assert job.state == State.FAILED
    assert job.error is not None
    assert "refused" in job.error and attacker.url in job.error
    assert attacker.seen == []  # not even a request without the token
    assert _downloads(stack) == []
    _assert_nothing_stored(stack, job.job_id)


def test_refusal_is_a_json_security_event_in_the_worker_log(
    make_stack: StackFactory, redis_db: redis.Redis, attacker: Listener
) -> None:
    """What an operator's alert matches on: a JSON line with event, job_id and the reason."""
    stack = make_stack()
    key = "victim-alert@example.com"
    _faults(stack, key, {"download_host": attacker.url})
    (job,) = wait_final(JobStore(redis_db), [stack.submit(key)], timeout=30)
    assert job.state == State.FAILED

    events = _refusals(stack, job.job_id)
    assert len(events) == 1, "no JSON download_refused event with this job_id in the worker log"
    (event,) = events
    assert event["level"] == "error"
    assert attacker.url in event["reason"]
    assert key not in json.dumps(event)


def test_redirect_from_the_download_endpoint_is_not_followed(
    make_stack: StackFactory, redis_db: redis.Redis, attacker: Listener
) -> None:
    stack = make_stack()
    key = "victim-redirect@example.com"
    _faults(stack, key, {"redirect_to": f"{attacker.url}/steal?x=1"})
    jobs = JobStore(redis_db)
    (job,) = wait_final(jobs, [stack.submit(key)], timeout=30)

    assert job.state == State.FAILED
    assert job.error is not None
    assert "redirect" in job.error and "not followed" in job.error
    assert attacker.authorized() == []
    assert attacker.seen == []
    # The token went to APSIS only, which answered the redirect once: no retry loop.
    assert [d["status"] for d in _settled_downloads(stack, 1)] == [302]
    _assert_nothing_stored(stack, job.job_id)


def test_download_url_on_the_apsis_host_but_another_port_is_refused(
    make_stack: StackFactory, redis_db: redis.Redis, neighbour: Listener
) -> None:
    stack = make_stack()
    jobs = JobStore(redis_db)
    apsis_port = stack.apsis_url.rsplit(":", 1)[1]
    cases = {
        "victim-port@example.com": neighbour.url,
        # https on the sandbox's own host and port is another origin than its http one.
        "victim-scheme@example.com": f"https://127.0.0.1:{apsis_port}",
        # "localhost" is the same machine, but not the configured origin.
        "victim-alias@example.com": f"http://localhost:{apsis_port}",
    }
    stack.sandbox_put(
        "/_sandbox/faults",
        {"keys": {key: {"download_host": host} for key, host in cases.items()}},
    )
    job_ids = [stack.submit(key) for key in cases]
    done = wait_final(jobs, job_ids, timeout=30)

    for job, host in zip(done, cases.values(), strict=True):
        assert job.state == State.FAILED, host
        assert job.error is not None
        assert "not on the configured APSIS origin" in job.error, job.error
    assert neighbour.seen == []
    assert _downloads(stack) == []


def test_metadata_address_is_refused_without_a_connection_attempt(
    make_stack: StackFactory, redis_db: redis.Redis
) -> None:
    stack = make_stack()
    key = "victim-metadata@example.com"
    _faults(stack, key, {"download_host": "http://169.254.169.254"})
    jobs = JobStore(redis_db)
    (job,) = wait_final(jobs, [stack.submit(key)], timeout=30)

    assert job.state == State.FAILED
    assert job.error is not None
    assert "169.254.169.254" in job.error and "refused" in job.error
    # Refused by the policy, not by a timed-out connection to the unroutable address.
    assert _seconds_from_ready_to_failed(jobs, job) < min(REFUSAL_WITHIN, CONNECT_TIMEOUT)
    assert _downloads(stack) == []
    _assert_nothing_stored(stack, job.job_id)


def _flip_first_mac_char(token: str) -> str:
    # The first character, not the last: the last base64 character of a 16-byte MAC also
    # carries padding bits, so some flips there decode to the same bytes.
    payload, mac = token.rsplit(".", 1)
    flipped = "A" if mac[0] != "A" else "B"
    return f"{payload}.{flipped}{mac[1:]}"


def test_forged_callbacks_are_refused_and_leave_the_job_waiting(
    make_stack: StackFactory, redis_db: redis.Redis, attacker: Listener
) -> None:
    stack = make_stack()
    key = "victim-forged@example.com"
    _faults(stack, key, {"drop_ready": True})
    jobs = JobStore(redis_db)
    job_id = stack.submit(key)
    deadline = time.monotonic() + 20
    while (job := jobs.find(job_id)) is None or job.state != State.VERIFIED:
        assert time.monotonic() < deadline, f"job never verified: {job and job.state}"
        time.sleep(0.05)

    real = callback_token.issue(job_id, job.attempt, secret=stack.env["CALLBACK_SECRET"], ttl=600)
    expiry = int(time.time()) + 600
    random_mac = base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode()
    forged = {
        "made-up": secrets.token_urlsafe(32),
        "made-up-shaped": f"{job_id}.{job.attempt}.{expiry}.{random_mac}",
        "flipped-mac": _flip_first_mac_char(real),
        "other-secret": callback_token.issue(job_id, job.attempt, secret="x" * 48, ttl=600),
    }
    body = {"code": 200, "message": f"{attacker.url}/audience/profiles/export-single/x"}
    for name, token in forged.items():
        answer = requests.post(f"{stack.webhook_url}/callbacks/{token}", json=body, timeout=5)
        assert answer.status_code == 403, (name, answer.status_code, answer.text)
    # The same route with the genuine token is accepted (a duplicate verify: harmless), so
    # the 403s above are the MAC check's doing.
    genuine = requests.post(
        f"{stack.webhook_url}/callbacks/{real}",
        json={"code": 100, "message": "Callback verified"},
        timeout=5,
    )
    assert genuine.status_code in (200, 202), genuine.text

    time.sleep(1.5)  # a forged "ready" that got through would be fetched by now
    job = jobs.get(job_id)
    assert job.state == State.VERIFIED
    assert not job.download_url
    assert attacker.seen == []
    assert _downloads(stack) == []
    assert Storage(stack.env["STORAGE_URL"]).list(f"jobs/{job_id}") == []


def test_download_over_the_size_cap_fails_cleanly(
    make_stack: StackFactory, redis_db: redis.Redis
) -> None:
    cap = 50_000
    stack = make_stack(env={"DOWNLOAD_MAX_BYTES": str(cap)})
    key = "victim-huge@example.com"
    _faults(stack, key, {"file_size": 500_000})
    jobs = JobStore(redis_db)
    (job,) = wait_final(jobs, [stack.submit(key, include_merged_profiles=False)], timeout=30)

    assert job.state == State.FAILED
    assert job.error is not None
    assert "DOWNLOAD_MAX_BYTES" in job.error and str(cap) in job.error, job.error
    # One try: a file over the cap is over it next time too.
    assert len(_settled_downloads(stack, 1)) == 1
    _assert_nothing_stored(stack, job.job_id)


def test_an_unparsable_download_url_is_refused_as_a_security_event(
    make_stack: StackFactory, redis_db: redis.Redis
) -> None:
    """``https://[api.apsis.one/...`` made urlsplit raise outside the policy: the job stayed
    ready, with no security event, and failed the same way on every re-dispatch."""
    stack = make_stack()
    key = "victim-unparsable@example.com"
    _faults(stack, key, {"download_host": "https://[api.apsis.one"})
    jobs = JobStore(redis_db)
    (job,) = wait_final(jobs, [stack.submit(key)], timeout=30)

    assert job.state == State.FAILED
    assert job.error is not None
    assert "refused" in job.error and "cannot be parsed" in job.error, job.error
    (event,) = _refusals(stack, job.job_id)
    assert event["level"] == "error" and "cannot be parsed" in event["reason"]
    assert _downloads(stack) == []
    _assert_nothing_stored(stack, job.job_id)


def test_a_redirect_from_the_token_endpoint_never_carries_the_credentials_elsewhere(
    make_stack: StackFactory, redis_db: redis.Redis, attacker: Listener
) -> None:
    """A 307 from /oauth/token asks the client to re-post client_id and client_secret to
    another host; it is an auth error instead, and the other host hears nothing."""
    stack = make_stack()
    stack.sandbox_put("/_sandbox/faults", {"default": {"token_redirect_to": attacker.url}})
    jobs = JobStore(redis_db)
    (job,) = wait_final(jobs, [stack.submit("victim-token@example.com")], timeout=30)

    assert job.state == State.FAILED
    assert job.error is not None
    assert "APSIS token" in job.error and "redirect (HTTP 307)" in job.error, job.error
    assert attacker.url in job.error and "not followed" in job.error
    assert attacker.seen == []
    assert [e for e in stack.journal() if e["kind"] == "export"] == []  # no token, no request
