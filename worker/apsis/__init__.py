"""The APSIS One client: its HTTP calls, its bearer token, and the pool-wide limiter.

``client`` (export requests, downloads, the download URL policy), ``bearer`` (the token
cache shared by the pool), ``ratelimit`` (APSIS's per-account limits, kept in Redis).

May import: ``worker.model``, ``worker.telemetry``, ``worker.config``, ``worker.errors``.
Independent of ``worker.deliverable``.
"""
