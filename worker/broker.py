"""Kept for deployments that set ``broker_transport = "worker.broker:Transport"``: the
transport lives in ``worker.queue.broker``."""

from worker.queue.broker import Transport

__all__ = ["Transport"]
