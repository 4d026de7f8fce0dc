"""The sandbox's Flask app factory: APSIS One endpoints, the control API and the journal."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from sandbox import api, control
from sandbox.config import SandboxConfig
from sandbox.state import SandboxState

#: Key of the SandboxState in app.extensions.
EXTENSION = "sandbox"

_DOWNLOAD_PREFIX = "/audience/profiles/export-single/accounts/"
_EXPORT_PREFIX = "/audience/profiles/export-single/"


def _kind(path: str) -> str:
    if path == "/oauth/token":
        return "token"
    if path.startswith(_DOWNLOAD_PREFIX):
        return "download"
    if path.startswith(_EXPORT_PREFIX):
        return "export"
    return "other"


def create_app(
    config: SandboxConfig | None = None,
    *,
    send_callback: Callable[[str, dict[str, Any]], int] | None = None,
) -> Flask:
    """A sandbox app; its state is app.extensions["sandbox"] (see sandbox_state).

    send_callback(url, body) -> status replaces real HTTP callbacks (for in-process tests).
    """
    app = Flask(__name__)
    app.extensions[EXTENSION] = SandboxState(config, send_callback=send_callback)
    app.register_blueprint(control.bp)
    app.register_blueprint(api.bp)

    @app.before_request
    def _open_entry() -> None:
        g.entry_deferred = False
        if request.path.startswith(control.bp.url_prefix or "/_sandbox"):
            g.entry = None
            return
        g.entry = {
            "ts": time.time(),
            "method": request.method,
            "path": request.path,
            "kind": _kind(request.path),
            "status": None,
            "auth": "Authorization" in request.headers,
            "account": None,
            "export_key": None,
            "definition_id": None,
        }

    @app.after_request
    def _close_entry(response: Response) -> Response:
        entry = g.get("entry")
        if entry is not None and not g.get("entry_deferred", False):
            entry["status"] = response.status_code
            sandbox_state(app).journal.record(entry)
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        return api.problem(exc.code or 500, exc.description or "error")

    return app


def sandbox_state(app: Flask) -> SandboxState:
    """The SandboxState of an app built by create_app (set_faults, journal, reset, ...)."""
    found: SandboxState = app.extensions[EXTENSION]
    return found
