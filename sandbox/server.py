"""Run the sandbox over real HTTP on loopback: in a background thread, or blocking for the CLI."""

from __future__ import annotations

import sys
import threading
from types import TracebackType

from flask import Flask
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from sandbox.app import create_app, sandbox_state
from sandbox.config import SandboxConfig
from sandbox.state import SandboxState


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr: the journal records every request."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class SandboxServer:
    """A sandbox on a threaded werkzeug server in a daemon thread; a context manager."""

    def __init__(
        self, config: SandboxConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.app: Flask = create_app(config)
        self.state: SandboxState = sandbox_state(self.app)
        self.host = host
        self.port = port
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL without a trailing slash, e.g. http://127.0.0.1:54321."""
        if self._server is None:
            raise RuntimeError("the sandbox server is not running")
        return f"http://{self.host}:{self._server.server_port}"

    def start(self) -> str:
        """Bind (port 0 picks a free one), serve in the background, return the base URL."""
        if self._server is None:
            self._server = make_server(
                self.host, self.port, self.app, threaded=True, request_handler=_QuietHandler
            )
            self._thread = threading.Thread(
                target=self._server.serve_forever, name="sandbox-server", daemon=True
            )
            self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop serving, close the socket and the callback thread. Safe to call twice."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self.state.close()

    def __enter__(self) -> SandboxServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def serve(host: str = "127.0.0.1", port: int = 8080, config: SandboxConfig | None = None) -> None:
    """Serve the sandbox until interrupted (the `apsis-export sandbox` command)."""
    server = make_server(host, port, create_app(config), threaded=True)
    sys.stderr.write(f"APSIS One sandbox on http://{host}:{server.server_port}\n")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
