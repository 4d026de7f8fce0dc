"""The APSIS sandbox in this process: its Flask app, and requests Sessions that reach it
through WSGITransport (no socket). Imports only the sandbox, never the product."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import requests
from flask import Flask

from sandbox.app import create_app, sandbox_state
from sandbox.config import SandboxConfig
from sandbox.wsgi_transport import WSGITransport


@contextmanager
def sandbox_app(
    config: SandboxConfig | None, send_callback: Callable[[str, dict[str, Any]], int]
) -> Iterator[Flask]:
    """The sandbox app, its state (and callback thread) closed on the way out."""
    app = create_app(config, send_callback=send_callback)
    try:
        yield app
    finally:
        sandbox_state(app).close()


@contextmanager
def sandbox_session(app: Flask, prefix: str) -> Iterator[requests.Session]:
    """A Session whose requests under ``prefix`` go to ``app``, closed on the way out."""
    session = requests.Session()
    session.mount(prefix, WSGITransport(app))
    try:
        yield session
    finally:
        session.close()
