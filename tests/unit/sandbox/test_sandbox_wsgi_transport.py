"""Tests for sandbox/wsgi_transport.py: a requests Session served by a WSGI app, no sockets."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import requests

from sandbox.wsgi_transport import WSGITransport


def _app(closed: list[bool]) -> Callable[..., Any]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        body = environ["wsgi.input"].read()

        def chunks() -> Iterator[bytes]:
            try:
                start_response(
                    "201 Created",
                    [
                        ("Content-Type", "text/plain; charset=utf-8"),
                        ("X-Host", environ["HTTP_HOST"]),
                    ],
                )
                yield f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']}?".encode()
                yield environ["QUERY_STRING"].encode() + b" " + body
                for _ in range(100):
                    yield b"x" * 1000
            finally:
                closed.append(True)

        return chunks()

    return app


def test_request_reaches_the_app_and_the_body_streams() -> None:
    closed: list[bool] = []
    session = requests.Session()
    session.mount("http://in.test", WSGITransport(_app(closed)))
    response = session.post("http://in.test/a/b?q=1", data=b"hello", stream=True)
    assert response.status_code == 201
    assert response.headers["X-Host"] == "in.test"
    pieces = list(response.iter_content(4096))
    assert b"".join(pieces).startswith(b"POST /a/b?q=1 hello")
    assert len(b"".join(pieces)) == len(b"POST /a/b?q=1 hello") + 100_000
    assert closed == [True]


def test_non_streamed_response_is_read_and_closed() -> None:
    closed: list[bool] = []
    session = requests.Session()
    session.mount("http://in.test", WSGITransport(_app(closed)))
    response = session.get("http://in.test/x")
    assert closed == [True]
    assert response.text.startswith("GET /x? ")
