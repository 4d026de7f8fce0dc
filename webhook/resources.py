"""What every blueprint needs, kept on the app (``app.extensions["apsis"]``, the Flask way).

``create_app`` builds it once per process; a blueprint reads it with
``resources(current_app)`` and never imports the app module.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
from flask import Flask

from worker.config import Settings
from worker.model.inbox import Inbox
from worker.model.jobs import JobStore


@dataclass
class WebhookResources:
    settings: Settings
    redis: redis.Redis
    jobs: JobStore
    inbox: Inbox

    @property
    def secrets(self) -> tuple[str, ...]:
        current = self.settings.CALLBACK_SECRET or ""
        previous = self.settings.CALLBACK_SECRET_PREVIOUS
        return (current, previous) if previous else (current,)


def resources(app: Flask) -> WebhookResources:
    found: WebhookResources = app.extensions["apsis"]
    return found
