"""A requests transport adapter that serves a Session from a WSGI app in-process, no sockets."""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import requests
from requests import PreparedRequest, Response
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict
from requests.utils import get_encoding_from_headers
from werkzeug.test import EnvironBuilder

from sandbox.callbacks import SendCallback

WSGIApp = Any  # a WSGI callable; Flask apps and plain functions both qualify


class _BodyStream(io.RawIOBase):
    """A file-like view of a WSGI app_iter: reads pull chunks lazily; close() closes the app."""

    def __init__(self, app_iter: Iterable[bytes]) -> None:
        super().__init__()
        self._app_iter = app_iter
        self._chunks: Iterator[bytes] = iter(app_iter)
        self._pending = b""
        self._released = False

    def prime(self) -> None:
        """Pull the first chunk now: a generator app calls start_response only when iterated."""
        if not self._pending:
            self._pending = next(self._chunks, b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                self._pending = next(self._chunks)
            except StopIteration:
                # Like urllib3, release at end of body: the app's close hooks run now.
                self.release_conn()
                return 0
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def release_conn(self) -> None:
        """Close the app's iterable once (requests calls this from Response.close())."""
        if not self._released:
            self._released = True
            close = getattr(self._app_iter, "close", None)
            if close is not None:
                # WSGI requires close(): Flask runs call_on_close hooks (the journal) here.
                close()

    def close(self) -> None:
        self.release_conn()
        super().close()


class WSGITransport(BaseAdapter):
    """Mount on a requests.Session to send its requests to `app` in-process.

    With stream=True the body is pulled from the app as the caller reads it.
    """

    def __init__(self, app: WSGIApp) -> None:
        super().__init__()
        self.app = app

    def send(  # noqa: PLR0917 - requests' adapter signature
        self,
        request: PreparedRequest,
        stream: bool = False,
        timeout: float | tuple[float, float] | tuple[float, None] | None = None,
        verify: bool | str = True,
        cert: bytes | str | tuple[bytes | str, bytes | str] | None = None,
        proxies: Mapping[str, str] | None = None,
    ) -> Response:
        url = urlsplit(request.url or "")
        body = request.body
        if body is None:
            data = b""
        elif isinstance(body, str):
            data = body.encode("utf-8")
        elif isinstance(body, bytes):
            data = body
        else:
            data = b"".join(part if isinstance(part, bytes) else part.encode() for part in body)
        headers = dict(request.headers)
        headers.pop("Content-Length", None)
        builder = EnvironBuilder(
            path=url.path or "/",
            base_url=f"{url.scheme}://{url.netloc}",
            query_string=url.query,
            method=request.method or "GET",
            headers=list(headers.items()),
            data=data,
        )
        if "Content-Length" in request.headers:
            # Keep the client's declared length: the app may judge a body by it (413).
            builder.content_length = int(request.headers["Content-Length"])
        environ = builder.get_environ()
        builder.close()

        captured: dict[str, Any] = {}

        def start_response(status: str, response_headers: list[tuple[str, str]], *_: Any) -> Any:
            captured["status"] = status
            captured["headers"] = response_headers
            return lambda _data: None

        raw = _BodyStream(self.app(environ, start_response))
        if "status" not in captured:
            raw.prime()
        if not stream:
            # Read and close now so the app's close hooks run before the caller sees it.
            content = raw.read()
            raw.close()
            raw = _BodyStream([content])
        return self._build(request, captured, raw)

    def _build(self, request: PreparedRequest, captured: dict[str, Any], raw: Any) -> Response:
        response = Response()
        status = str(captured["status"])
        code, _, reason = status.partition(" ")
        response.status_code = int(code)
        response.reason = reason
        response.headers = CaseInsensitiveDict(captured["headers"])
        response.encoding = get_encoding_from_headers(response.headers)
        response.raw = raw
        response.url = request.url or ""
        response.request = request
        # requests types `connection` as an HTTPAdapter; any adapter with send() works.
        response.connection = self  # type: ignore[assignment]
        return response

    def close(self) -> None:
        """Nothing pooled to release."""


def wsgi_sender(app: WSGIApp, host: str = "http://callbacks.test") -> SendCallback:
    """A send_callback that delivers callbacks to another WSGI app in-process."""
    session = requests.Session()
    session.mount(host, WSGITransport(app))

    def send(url: str, body: dict[str, Any]) -> int:
        return session.post(url, json=body).status_code

    return send
