"""The sandbox over real HTTP on 127.0.0.1: token, export, callbacks to a receiver, download."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer

pytestmark = pytest.mark.integration


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[str, dict[str, Any]]]

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length))
        self.server.received.append((self.path, body))  # type: ignore[attr-defined]
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(
        SandboxConfig(verify_delay=0.01, ready_delay=0.05, file_size=500_000)
    ) as server:
        yield server


def _wait(received: list[tuple[str, dict[str, Any]]], count: int) -> None:
    deadline = time.monotonic() + 5
    while len(received) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(received) >= count, received


def test_token_export_callbacks_and_download_over_http(
    sandbox: SandboxServer, receiver: ThreadingHTTPServer
) -> None:
    base = sandbox.url
    assert base.startswith("http://127.0.0.1:")
    with requests.Session() as session:
        token = session.post(
            f"{base}/oauth/token",
            json={
                "grant_type": "client_credentials",
                "client_id": "sandbox",
                "client_secret": "sandbox",
            },
            timeout=5,
        ).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        callback_url = f"http://127.0.0.1:{receiver.server_port}/cb/job-1?t=secret"
        response = session.post(
            f"{base}/audience/profiles/export-single/PERSON-1",
            json={"callback_url": callback_url, "include_merged_profiles": True},
            headers=headers,
            timeout=5,
        )
        assert response.status_code == 202
        received: list[tuple[str, dict[str, Any]]] = receiver.received  # type: ignore[attr-defined]
        _wait(received, 2)
        assert [body["code"] for _, body in received] == [100, 200]
        assert received[0][0] == "/cb/job-1?t=secret"
        download_url = received[1][1]["message"]
        assert download_url.startswith(f"{base}/audience/profiles/export-single/accounts/sandbox/")

        digest = hashlib.sha256()
        with session.get(download_url, headers=headers, stream=True, timeout=5) as download:
            assert download.status_code == 200
            assert download.headers.get("Transfer-Encoding") == "chunked"
            for chunk in download.iter_content(65_536):
                digest.update(chunk)
        exports = session.get(f"{base}/_sandbox/exports", timeout=5).json()
        assert exports[0]["sha256"] == digest.hexdigest()
        assert exports[0]["bytes"] == 500_000

        sandbox.state.journal.wait_for(lambda es: any(e["kind"] == "download" for e in es))
        journal = session.get(f"{base}/_sandbox/journal", timeout=5).json()
        kinds = [e["kind"] for e in journal]
        assert kinds.count("callback") == 2
        assert [k for k in kinds if k != "callback"] == ["token", "export", "download"]
        download_entry = next(e for e in journal if e["kind"] == "download")
        assert download_entry["sha256"] == digest.hexdigest()
        assert download_entry["bytes"] == 500_000


def test_stop_releases_the_port() -> None:
    server = SandboxServer()
    url = server.start()
    assert requests.get(f"{url}/_sandbox/health", timeout=5).json() == {"ok": True}
    server.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/_sandbox/health", timeout=2)
    server.stop()
