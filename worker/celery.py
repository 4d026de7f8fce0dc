"""Kept for ``celery -A worker`` (Celery looks for ``worker.celery``) and deployments that
name it: the app lives in ``worker.queue.app``."""

from worker.queue.app import app, send_chain, send_task

__all__ = ["app", "send_chain", "send_task"]
