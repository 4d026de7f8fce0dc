"""The Celery plumbing: the app, the broker transport, and the in-flight message list.

``app`` (the Celery app, its config, the inbox/feeder/metrics bootsteps), ``broker`` (the
BLMOVE transport), ``inflight`` (task messages a lost connection left in flight).
``worker.celery`` and ``worker.broker`` re-export the app and the transport for
deployments that name them.

May import: ``worker.ops``, ``worker.flow`` and below.
"""
