"""The callback webhook: a thin Flask app that records APSIS callbacks in the Redis inbox."""

from __future__ import annotations

from webhook.app import create_app

__all__ = ["create_app"]
