"""worker/apsis/client.py: the client against the in-process sandbox, and its URL policy."""

from __future__ import annotations

import email.utils
import hashlib
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import requests
from flask import Flask
from requests.adapters import BaseAdapter
from sandbox_in_process import sandbox_app, sandbox_session

from sandbox.app import sandbox_state
from sandbox.config import SandboxConfig
from sandbox.state import SandboxState
from sandbox.wsgi_transport import WSGITransport
from worker.apsis.client import (
    MAX_RETRY_AFTER,
    ApsisClient,
    DownloadPolicy,
    Limits,
    max_lateness,
    retry_after_seconds,
)
from worker.apsis.ratelimit import Limit
from worker.errors import (
    ApsisAuthError,
    DownloadError,
    DownloadRefused,
    DownloadTooLarge,
    PermanentApsisError,
    RateLimited,
    RetryableApsisError,
)

#: Loopback http, so the production DownloadPolicy's sandbox rule applies unchanged. The
#: sandbox transport is mounted on this prefix; port 1 is never dialled.
BASE = "http://127.0.0.1:1"
CALLBACK_URL = "https://hooks.example.test/apsis/callbacks/job-1?token=t0k3n"
#: Client-side pacing out of the way; the tests that are about pacing set their own.
FAST = Limits(
    export=Limit(1000, 1.0),
    download=Limit(1000, 1.0),
    token=Limit(1000, 1.0),
    other=Limit(1000, 1.0),
)
NO_LIMITS: dict[str, tuple[int, float] | None] = {
    "token": None,
    "export": None,
    "download": None,
    "other": None,
}
FILE_SIZE = 50_000


class CallbackSink:
    """Stands in for the webhook: records the sandbox's callbacks."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self._changed = threading.Condition()

    def __call__(self, url: str, body: dict[str, Any]) -> int:
        with self._changed:
            self.bodies.append(body)
            self._changed.notify_all()
        return 204

    def download_url(self, timeout: float = 3.0) -> str:
        """The message of the first ready (200) callback."""
        with self._changed:
            ready = self._changed.wait_for(
                lambda: any(b["code"] == 200 for b in self.bodies), timeout
            )
            assert ready, f"no ready callback in {timeout} s: {self.bodies}"
            url: str = next(b["message"] for b in self.bodies if b["code"] == 200)
            return url


class Tripwire(BaseAdapter):
    """Mounted for every other origin: records any request that would leave the sandbox."""

    def __init__(self) -> None:
        super().__init__()
        self.requested: list[str] = []

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        self.requested.append(str(request.url))
        raise AssertionError(f"request left the sandbox: {request.url}")

    def close(self) -> None:
        pass


class Unreachable(BaseAdapter):
    """APSIS cannot be reached: every request fails to connect."""

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        raise requests.ConnectionError("connection refused")

    def close(self) -> None:
        pass


class FailingPath(WSGITransport):
    """The sandbox, except that requests whose path contains ``fragment`` cannot connect."""

    def __init__(self, app: Flask, fragment: str) -> None:
        super().__init__(app)
        self.fragment = fragment

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        if self.fragment in str(request.url):
            raise requests.ConnectionError("connection reset")
        return super().send(request, *args, **kwargs)


@pytest.fixture
def sink() -> CallbackSink:
    return CallbackSink()


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    return SandboxConfig(
        verify_delay=0.0, ready_delay=0.01, limits=dict(NO_LIMITS), file_size=FILE_SIZE
    )


@pytest.fixture
def app(sandbox_config: SandboxConfig, sink: CallbackSink) -> Iterator[Flask]:
    with sandbox_app(sandbox_config, sink) as app:
        yield app


@pytest.fixture
def state(app: Flask) -> SandboxState:
    return sandbox_state(app)


@pytest.fixture
def tripwire() -> Tripwire:
    return Tripwire()


@pytest.fixture
def session(app: Flask, tripwire: Tripwire) -> Iterator[requests.Session]:
    with sandbox_session(app, BASE + "/") as session:
        # Every other origin: the longer sandbox prefix still wins (requests matches the
        # longest mounted prefix first).
        session.mount("http://", tripwire)
        session.mount("https://", tripwire)
        yield session


@pytest.fixture
def redis_client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def make_client(
    session: requests.Session,
    redis_client: fakeredis.FakeRedis,
    *,
    client_secret: str = "sandbox",
    client_id: str = "sandbox",
    limits: Limits = FAST,
    max_wait: float = 1.5,
) -> ApsisClient:
    return ApsisClient(
        base_url=BASE,
        client_id=client_id,
        client_secret=client_secret,
        account="sandbox",
        redis_client=redis_client,
        session=session,
        limits=limits,
        max_wait=max_wait,
    )


def failing_client(app: Flask, redis_client: fakeredis.FakeRedis, fragment: str) -> ApsisClient:
    """A client on the sandbox whose requests to paths containing ``fragment`` cannot connect."""
    session = requests.Session()
    session.mount(BASE + "/", FailingPath(app, fragment))
    return make_client(session, redis_client)


@pytest.fixture
def client(session: requests.Session, redis_client: fakeredis.FakeRedis) -> ApsisClient:
    return make_client(session, redis_client)


def export(client: ApsisClient, export_key: str = "ABC-123", **body: Any) -> None:
    client.request_export(
        export_key,
        body.get("callback_url", CALLBACK_URL),
        history=body.get("history", False),
        definitions=body.get("definitions", False),
        merged=body.get("merged", False),
    )


def statuses(state: SandboxState, kind: str) -> list[int]:
    return [entry["status"] for entry in state.journal.entries(kind=kind)]


def sandbox_exports(session: requests.Session) -> list[dict[str, Any]]:
    exports: list[dict[str, Any]] = session.get(BASE + "/_sandbox/exports").json()
    return exports


def definition_url(definition_id: str) -> str:
    """The download URL of a sandbox export definition (as its ready callback names it)."""
    return (
        f"{BASE}/audience/profiles/export-single/accounts/sandbox/definitions/"
        f"{definition_id}?metadata=true"
    )


def only_definition_url(state: SandboxState) -> str:
    """The download URL of the one export the sandbox holds, without waiting for its callback."""
    [definition] = state.definitions()
    return definition_url(definition.definition_id)


def download_to(client: ApsisClient, url: str, path: Path, **kwargs: Any) -> Any:
    with path.open("wb") as out:
        return client.download(
            url,
            out,
            max_bytes=kwargs.get("max_bytes", 10_000_000),
            timeout=kwargs.get("timeout", 30.0),
        )


# -- requesting an export -------------------------------------------------------------------


def test_export_request_is_accepted_with_the_callers_options(
    client: ApsisClient, state: SandboxState, sink: CallbackSink
) -> None:
    export(client, "ABC 123", history=True, definitions=False, merged=True)

    [definition] = state.definitions()
    assert definition.export_key == "ABC 123"
    assert (definition.history, definition.definitions, definition.merged) == (True, False, True)
    assert statuses(state, "token") == [200]
    [entry] = state.journal.entries(kind="export")
    assert (entry["status"], entry["auth"]) == (202, True)
    assert sink.download_url().startswith(BASE + "/audience/profiles/export-single/accounts/")


def test_the_cached_token_serves_later_requests(client: ApsisClient, state: SandboxState) -> None:
    export(client, "A-1")
    export(client, "A-2")
    assert statuses(state, "token") == [200]
    assert statuses(state, "export") == [202, 202]


@pytest.mark.parametrize(
    ("export_key", "callback_url", "faults", "status"),
    [
        ("ABC-123", "not a url", None, 400),
        ("unknown-profile", CALLBACK_URL, None, 404),
        ("ABC-123", CALLBACK_URL + "x" * 100_001, None, 413),
        ("ABC-123", CALLBACK_URL, {"export_errors": [410]}, 410),
    ],
    ids=["400-validation", "404-unknown-key", "413-body-too-large", "410-gone"],
)
def test_refusals_that_cannot_change_are_permanent(
    client: ApsisClient,
    state: SandboxState,
    export_key: str,
    callback_url: str,
    faults: dict[str, Any] | None,
    status: int,
) -> None:
    if faults:
        state.set_faults({"default": faults})
    with pytest.raises(PermanentApsisError) as caught:
        export(client, export_key, callback_url=callback_url)
    assert type(caught.value) is PermanentApsisError
    assert caught.value.status == status
    assert statuses(state, "export") == [status]
    assert state.definitions() == []


def test_429_with_retry_after_is_retryable_after_that_delay(
    client: ApsisClient, state: SandboxState
) -> None:
    state.set_faults({"default": {"export_errors": [{"status": 429, "retry_after": 7}]}})
    with pytest.raises(RetryableApsisError) as caught:
        export(client)
    assert (caught.value.status, caught.value.retry_after) == (429, 7.0)
    export(client)  # the injected answer was one-shot: the next request goes through
    assert statuses(state, "export") == [429, 202]


@pytest.mark.parametrize(
    "faults",
    [
        {"export_errors": [{"status": 429, "retry_after": None}]},
        {"export_errors": [429], "omit_retry_after": True},
    ],
    ids=["no-header", "omit_retry_after"],
)
def test_429_without_retry_after_leaves_the_delay_to_the_caller(
    client: ApsisClient, state: SandboxState, faults: dict[str, Any]
) -> None:
    state.set_faults({"default": faults})
    with pytest.raises(RetryableApsisError) as caught:
        export(client)
    assert caught.value.status == 429
    assert caught.value.retry_after is None


def test_the_sandboxs_own_rate_limit_is_retryable_with_its_retry_after(
    session: requests.Session, redis_client: fakeredis.FakeRedis, state: SandboxState
) -> None:
    state.patch_config({"limits": {"export": (1, 60.0)}})
    client = make_client(session, redis_client)
    export(client, "A-1")
    with pytest.raises(RetryableApsisError) as caught:
        export(client, "A-2")
    assert caught.value.status == 429
    assert caught.value.retry_after is not None
    assert 59.0 <= caught.value.retry_after <= 60.0


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504])
def test_server_failures_are_retryable(
    client: ApsisClient, state: SandboxState, status: int
) -> None:
    state.set_faults({"default": {"export_errors": [status]}})
    with pytest.raises(RetryableApsisError) as caught:
        export(client)
    assert caught.value.status == status
    # The sandbox sends Retry-After: 1 with an injected 503 (and 429), nothing otherwise.
    assert caught.value.retry_after == (1.0 if status == 503 else None)


def test_connection_error_on_the_token_request_is_retryable(
    redis_client: fakeredis.FakeRedis,
) -> None:
    session = requests.Session()
    session.mount("http://", Unreachable())
    with pytest.raises(RetryableApsisError):
        export(make_client(session, redis_client))


def test_connection_error_on_the_export_request_is_retryable(
    app: Flask, redis_client: fakeredis.FakeRedis, state: SandboxState
) -> None:
    with pytest.raises(RetryableApsisError):
        export(failing_client(app, redis_client, "/export-single/"))
    assert statuses(state, "token") == [200]
    assert state.definitions() == []


def test_the_pools_export_pace_is_shared_and_a_long_wait_is_handed_back(
    session: requests.Session, redis_client: fakeredis.FakeRedis, state: SandboxState
) -> None:
    # Two processes of the pool (two clients, one Redis) with the documented 1 export/s.
    paced = Limits(export=Limit(1, 1.0), token=Limit(1000, 1.0))
    first = make_client(session, redis_client, limits=paced, max_wait=0.0)
    second = make_client(session, redis_client, limits=paced, max_wait=0.0)
    export(first, "A-1")
    with pytest.raises(RetryableApsisError) as caught:
        export(second, "A-2")
    assert caught.value.retry_after is not None
    assert 0.9 < caught.value.retry_after <= Limit(1, 1.0).interval
    assert statuses(state, "export") == [202]  # the second request was never sent


# -- the token ------------------------------------------------------------------------------


@pytest.mark.parametrize("auth_style", ["401", "403"])
def test_an_expired_token_is_refreshed_once_and_the_request_retried_once(
    client: ApsisClient, state: SandboxState, auth_style: str
) -> None:
    export(client, "A-1")
    state.set_faults({"default": {"expire_tokens": True, "auth_style": auth_style}})

    export(client, "A-2")

    assert statuses(state, "token") == [200, 200]  # exactly one extra token request
    assert statuses(state, "export") == [202, int(auth_style), 202]
    assert [d.export_key for d in state.definitions()] == ["A-1", "A-2"]


def test_a_request_refused_for_its_token_is_retried_at_a_new_slot_not_at_once(
    session: requests.Session, redis_client: fakeredis.FakeRedis, state: SandboxState
) -> None:
    # The refused request had its slot; its retry sent at once (after a token refresh that may
    # itself wait for a token slot) would crowd the requests paced after it into a 429.
    paced = Limits(export=Limit(5, 1.0), token=Limit(1000, 1.0))
    client = make_client(session, redis_client, limits=paced)
    export(client, "A-1")
    state.set_faults({"default": {"expire_tokens": True}})

    export(client, "A-2")

    refused, retried = state.journal.entries(kind="export")[1:]
    assert (refused["status"], retried["status"]) == (401, 202)
    assert retried["ts"] - refused["ts"] >= 0.8 * paced.export.interval


class Leaping:
    """A sandbox clock whose every reading is two days after the last: each token has
    expired by the time it is checked, however fresh (APSIS refusing every token)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        self.now += 2 * 86_400
        return self.now


def test_a_token_refused_even_after_a_refresh_is_an_auth_error(
    client: ApsisClient, state: SandboxState
) -> None:
    state.clock = Leaping()
    with pytest.raises(ApsisAuthError):
        export(client)
    assert statuses(state, "token") == [200, 200]  # one refresh, no loop
    assert statuses(state, "export") == [401, 401]


@pytest.mark.parametrize(
    ("client_id", "client_secret"), [("sandbox", "wrong"), ("nobody", "sandbox")]
)
def test_bad_credentials_are_an_auth_error_and_nothing_else_is_sent(
    session: requests.Session,
    redis_client: fakeredis.FakeRedis,
    state: SandboxState,
    client_id: str,
    client_secret: str,
) -> None:
    client = make_client(session, redis_client, client_id=client_id, client_secret=client_secret)
    with pytest.raises(ApsisAuthError):
        export(client)
    assert statuses(state, "token") == [401]
    assert state.journal.entries(kind="export") == []


@pytest.mark.parametrize(("status", "retry_after"), [(429, 1.0), (500, None), (503, 1.0)])
def test_a_failing_token_endpoint_is_retryable(
    client: ApsisClient, state: SandboxState, status: int, retry_after: float | None
) -> None:
    state.set_faults({"default": {"token_errors": [status]}})
    with pytest.raises(RetryableApsisError) as caught:
        export(client)
    assert (caught.value.status, caught.value.retry_after) == (status, retry_after)
    assert state.journal.entries(kind="export") == []
    export(client)  # and the next attempt fetches a token and goes through
    assert statuses(state, "token") == [status, 200]


def test_a_redirect_from_the_token_endpoint_is_an_auth_error_and_never_followed(
    client: ApsisClient, state: SandboxState, tripwire: Tripwire
) -> None:
    # A 307 asks the client to re-post the same body (client_id, client_secret) elsewhere.
    state.set_faults({"default": {"token_redirect_to": "http://127.0.0.2:1/oauth/token"}})
    with pytest.raises(ApsisAuthError) as caught:
        export(client)
    assert "redirect (HTTP 307)" in str(caught.value)
    assert "http://127.0.0.2:1" in str(caught.value) and "not followed" in str(caught.value)
    assert "sandbox" not in str(caught.value)  # the credentials are not quoted either
    assert tripwire.requested == []
    assert state.journal.entries(kind="export") == []


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_from_the_export_endpoint_is_permanent_and_never_followed(
    client: ApsisClient, state: SandboxState, tripwire: Tripwire, status: int
) -> None:
    state.set_faults({"default": {"export_errors": [status]}})
    with pytest.raises(PermanentApsisError) as caught:
        export(client)
    assert type(caught.value) is PermanentApsisError
    assert caught.value.status == status
    assert f"redirect (HTTP {status})" in str(caught.value)
    assert statuses(state, "export") == [status]
    assert tripwire.requested == []


# -- downloading ----------------------------------------------------------------------------


def test_download_streams_the_file_with_the_sandboxs_digest(
    client: ApsisClient,
    session: requests.Session,
    state: SandboxState,
    sink: CallbackSink,
    tmp_path: Path,
) -> None:
    export(client, merged=True)
    target = tmp_path / "export.json"

    got = download_to(client, sink.download_url(), target)

    [expected] = sandbox_exports(session)
    assert (got.sha256, got.bytes) == (expected["sha256"], expected["bytes"])
    assert expected["bytes"] == FILE_SIZE
    assert hashlib.sha256(target.read_bytes()).hexdigest() == expected["sha256"]
    [entry] = state.journal.entries(kind="download")
    assert (entry["status"], entry["auth"], entry["bytes"]) == (200, True, FILE_SIZE)


def test_download_with_an_expired_token_refreshes_once(
    client: ApsisClient,
    session: requests.Session,
    state: SandboxState,
    sink: CallbackSink,
    tmp_path: Path,
) -> None:
    export(client)
    url = sink.download_url()
    state.set_faults({"default": {"expire_tokens": True}})

    got = download_to(client, url, tmp_path / "export.json")

    assert got.sha256 == sandbox_exports(session)[0]["sha256"]
    assert statuses(state, "token") == [200, 200]
    assert statuses(state, "download") == [401, 200]


def test_download_before_the_file_is_ready_is_retryable(
    client: ApsisClient, state: SandboxState, tmp_path: Path
) -> None:
    state.set_faults({"keys": {"SLOW-1": {"ready_delay": 60}}})
    export(client, "SLOW-1")
    url = only_definition_url(state)
    with pytest.raises(RetryableApsisError) as caught:
        download_to(client, url, tmp_path / "export.json")
    assert caught.value.status == 202


def test_download_of_an_unknown_definition_is_retryable_not_ready(
    client: ApsisClient, tmp_path: Path
) -> None:
    url = definition_url("nope")
    with pytest.raises(RetryableApsisError) as caught:
        download_to(client, url, tmp_path / "export.json")
    assert caught.value.status == 404


def test_an_expired_download_link_is_permanent(
    client: ApsisClient, state: SandboxState, sink: CallbackSink, tmp_path: Path
) -> None:
    state.set_faults({"default": {"download_errors": [410]}})
    export(client)
    with pytest.raises(PermanentApsisError) as caught:
        download_to(client, sink.download_url(), tmp_path / "export.json")
    assert type(caught.value) is PermanentApsisError
    assert caught.value.status == 410


def test_a_failed_export_answers_503_which_is_retryable(
    client: ApsisClient, state: SandboxState, tmp_path: Path
) -> None:
    state.set_faults({"default": {"failure_code": 500}})
    export(client)
    url = only_definition_url(state)
    with pytest.raises(RetryableApsisError) as caught:
        download_to(client, url, tmp_path / "export.json")
    assert caught.value.status == 503


def test_a_truncated_download_returns_fewer_bytes_than_the_file(
    client: ApsisClient,
    session: requests.Session,
    state: SandboxState,
    sink: CallbackSink,
    tmp_path: Path,
) -> None:
    state.set_faults({"default": {"truncate_at": 1000}})
    export(client)
    target = tmp_path / "export.json"

    got = download_to(client, sink.download_url(), target)

    [expected] = sandbox_exports(session)
    assert got.bytes == 1000 < expected["bytes"]
    assert target.stat().st_size == 1000
    assert got.sha256 != expected["sha256"]
    assert got.sha256 == hashlib.sha256(target.read_bytes()).hexdigest()


def test_a_corrupted_download_keeps_its_length_but_not_its_digest(
    client: ApsisClient,
    session: requests.Session,
    state: SandboxState,
    sink: CallbackSink,
    tmp_path: Path,
) -> None:
    state.set_faults({"default": {"corrupt": True}})
    export(client)
    got = download_to(client, sink.download_url(), tmp_path / "export.json")
    [expected] = sandbox_exports(session)
    assert got.bytes == expected["bytes"]
    assert got.sha256 != expected["sha256"]


def test_a_redirect_is_refused_and_never_followed(
    client: ApsisClient,
    state: SandboxState,
    sink: CallbackSink,
    tripwire: Tripwire,
    tmp_path: Path,
) -> None:
    state.set_faults({"default": {"redirect_to": "https://collector.example.test/steal"}})
    export(client)
    with pytest.raises(DownloadRefused):
        download_to(client, sink.download_url(), tmp_path / "export.json")
    assert statuses(state, "download") == [302]
    assert tripwire.requested == []


@pytest.mark.parametrize(
    "download_host",
    ["https://collector.example.test", "http://127.0.0.1:2", "http://localhost:1"],
)
def test_a_download_url_off_the_apsis_origin_is_refused_before_any_request(
    client: ApsisClient,
    state: SandboxState,
    sink: CallbackSink,
    tripwire: Tripwire,
    tmp_path: Path,
    download_host: str,
) -> None:
    state.set_faults({"default": {"download_host": download_host}})
    export(client)
    url = sink.download_url()
    assert url.startswith(download_host + "/")

    with pytest.raises(DownloadRefused):
        client.check_download_url(url)
    with pytest.raises(DownloadRefused):
        download_to(client, url, tmp_path / "export.json")

    assert state.journal.entries(kind="download") == []
    assert tripwire.requested == []


def test_a_download_over_max_bytes_is_abandoned(
    client: ApsisClient, sink: CallbackSink, tmp_path: Path
) -> None:
    export(client)
    target = tmp_path / "export.json"
    with pytest.raises(DownloadTooLarge):
        download_to(client, sink.download_url(), target, max_bytes=FILE_SIZE - 1)
    assert target.stat().st_size <= FILE_SIZE - 1


def test_a_download_slower_than_its_timeout_is_abandoned(
    client: ApsisClient, sink: CallbackSink, tmp_path: Path
) -> None:
    export(client)
    with pytest.raises(DownloadError) as caught:
        download_to(client, sink.download_url(), tmp_path / "export.json", timeout=0.0)
    assert type(caught.value) is DownloadError


def test_connection_error_on_the_download_is_retryable(
    app: Flask,
    redis_client: fakeredis.FakeRedis,
    sink: CallbackSink,
    state: SandboxState,
    tmp_path: Path,
) -> None:
    client = failing_client(app, redis_client, "/definitions/")
    export(client)
    with pytest.raises(RetryableApsisError):
        download_to(client, sink.download_url(), tmp_path / "export.json")
    assert state.journal.entries(kind="download") == []


# -- the download URL policy ----------------------------------------------------------------

APSIS = "https://api.apsis.one"
DOWNLOAD_PATH = (
    "/audience/profiles/export-single/accounts/test/definitions/"
    "01af2d3c-d30d-43ec-8f47-996c881148b4?metadata=true"
)


def public(host: str) -> list[str]:
    return ["52.16.0.10"]


def test_https_on_the_configured_origin_is_allowed() -> None:
    policy = DownloadPolicy(APSIS, resolve=public)
    policy.check(APSIS + DOWNLOAD_PATH)
    policy.check("https://API.apsis.one:443" + DOWNLOAD_PATH)


@pytest.mark.parametrize(
    "url",
    [
        "http://api.apsis.one" + DOWNLOAD_PATH,  # plain http for an https base
        "https://api-apac.apsis.one" + DOWNLOAD_PATH,  # another host
        "https://api.apsis.one.collector.example" + DOWNLOAD_PATH,
        "https://api.apsis.one:8443" + DOWNLOAD_PATH,  # another port
        "https://api.apsis.one:99999" + DOWNLOAD_PATH,  # not a port
        "ftp://api.apsis.one" + DOWNLOAD_PATH,  # another scheme
        "https://user:secret@api.apsis.one" + DOWNLOAD_PATH,  # userinfo
        "https://api.apsis.one@collector.example" + DOWNLOAD_PATH,
        "http://127.0.0.1" + DOWNLOAD_PATH,
        DOWNLOAD_PATH,  # no host at all
        "https://[api.apsis.one" + DOWNLOAD_PATH,  # urlsplit: "Invalid IPv6 URL"
        "https://api.apsis.one]" + DOWNLOAD_PATH,
        "https://[api.apsis.one]" + DOWNLOAD_PATH,  # brackets around a name
    ],
)
def test_anything_but_the_configured_https_origin_is_refused(url: str) -> None:
    with pytest.raises(DownloadRefused):
        DownloadPolicy(APSIS, resolve=public).check(url)


def no_lookups(host: str) -> list[str]:
    raise AssertionError("a loopback sandbox needs no DNS lookup")


@pytest.mark.parametrize("base", ["http://127.0.0.1:8080", "http://localhost:8080"])
def test_loopback_http_is_allowed_only_for_a_loopback_base_on_its_port(base: str) -> None:
    policy = DownloadPolicy(base, resolve=no_lookups)
    policy.check(base + DOWNLOAD_PATH)
    for url in (
        base.replace("8080", "8081") + DOWNLOAD_PATH,
        base.replace("http:", "https:") + DOWNLOAD_PATH,
        "http://10.0.0.5:8080" + DOWNLOAD_PATH,
    ):
        with pytest.raises(DownloadRefused):
            policy.check(url)


def test_plain_http_is_never_allowed_for_a_non_loopback_base() -> None:
    base = "http://apsis.internal.example:8080"
    with pytest.raises(DownloadRefused):
        DownloadPolicy(base, resolve=public).check(base + DOWNLOAD_PATH)


@pytest.mark.parametrize(
    "addresses",
    [
        ["10.1.2.3"],
        ["169.254.169.254"],
        ["127.0.0.1"],
        ["52.16.0.10", "192.168.1.1"],
        ["fd00::1"],
        ["100.100.100.200"],  # shared address space: a cloud metadata service
        [],  # does not resolve
    ],
)
def test_a_public_base_host_resolving_to_a_private_address_is_refused(
    addresses: list[str],
) -> None:
    policy = DownloadPolicy(APSIS, resolve=lambda host: addresses)
    with pytest.raises(DownloadRefused):
        policy.check(APSIS + DOWNLOAD_PATH)


# -- Retry-After ----------------------------------------------------------------------------

NOW = 1_700_000_000.0


def http_date(timestamp: float) -> str:
    return email.utils.format_datetime(datetime.fromtimestamp(timestamp, UTC), usegmt=True)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 5 ", 5.0),
        ("0", 0.0),
        (http_date(NOW + 90), 90.0),
        (http_date(NOW - 90), 0.0),  # a date in the past: go now
        ("999999", MAX_RETRY_AFTER),
        (http_date(NOW + 7 * 86_400), MAX_RETRY_AFTER),
        (None, None),
        ("", None),
        ("soon", None),
        ("-5", None),
        ("1.5", None),
        ("\u00b2", None),  # a latin-1 superscript two: isdigit() but not a number
        ("\u0661\u0662", None),  # Arabic-Indic digits: not HTTP's DIGIT
    ],
)
def test_retry_after_seconds(value: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(value, now=NOW) == seconds


def test_a_request_that_missed_its_slot_takes_a_new_one_instead_of_crowding_the_next(
    client: ApsisClient, state: SandboxState
) -> None:
    def request(send_at: float) -> None:
        client.request_export(
            "ABC-123",
            CALLBACK_URL,
            history=False,
            definitions=False,
            merged=False,
            paced=False,
            send_at=send_at,
        )

    late = max_lateness(client.limits.export) + 0.05
    with pytest.raises(RateLimited, match="missed its export slot"):
        request(time.monotonic() - late)
    assert state.journal.entries(kind="export") == []

    request(time.monotonic() + 0.01)
    assert statuses(state, "export") == [202]


# -- proxies and CA bundle: read from the environment once, when the client is made ----------


class Recorder(BaseAdapter):
    """Records the proxies and verify setting each call was sent with; no socket opened."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[dict[str, Any]] = []

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        self.sent.append(
            {
                "url": request.url,
                "proxy": requests.utils.select_proxy(request.url or "", kwargs.get("proxies")),
                "verify": kwargs.get("verify"),
            }
        )
        raise requests.ConnectionError("recorded, not sent")

    def close(self) -> None:
        pass


APSIS_HTTPS = "https://api.apsis.example"
PROXY_VARIABLES = (
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
)


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """Every session's calls go to a Recorder; the environment starts with no proxy or CA."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    recorder = Recorder()
    monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", recorder.send)
    return recorder


def send_one(redis_client: fakeredis.FakeRedis) -> None:
    """The first call an APSIS client made the production way (no session given) sends."""
    client = ApsisClient(
        base_url=APSIS_HTTPS,
        client_id="id",
        client_secret="secret",
        account="a",
        redis_client=redis_client,
        limits=FAST,
    )
    with pytest.raises(RetryableApsisError):
        client.tokens.get()


def test_a_corporate_proxy_and_ca_bundle_from_the_environment_are_used(
    recorder: Recorder, redis_client: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp.example:3128")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/corp/ca.pem")
    send_one(redis_client)
    assert recorder.sent[0]["url"].startswith(APSIS_HTTPS)
    assert recorder.sent[0]["proxy"] == "http://proxy.corp.example:3128"
    assert recorder.sent[0]["verify"] == "/etc/corp/ca.pem"


def test_no_proxy_naming_the_apsis_host_bypasses_the_proxy(
    recorder: Recorder, redis_client: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp.example:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,.apsis.example")
    send_one(redis_client)
    assert recorder.sent[0]["proxy"] is None
    assert recorder.sent[0]["verify"] is True


def test_the_environment_is_read_when_the_client_is_made_not_on_every_call(
    recorder: Recorder, redis_client: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy-at-start.example:3128")
    client = ApsisClient(
        base_url=APSIS_HTTPS,
        client_id="id",
        client_secret="secret",
        account="a",
        redis_client=redis_client,
        limits=FAST,
    )
    # requests would read these on each call (about 0.15 ms each); the client read them once.
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy-changed-later.example:3128")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/changed/later.pem")
    with pytest.raises(RetryableApsisError):
        client.tokens.get()
    assert recorder.sent[0]["proxy"] == "http://proxy-at-start.example:3128"
    assert recorder.sent[0]["verify"] is True
