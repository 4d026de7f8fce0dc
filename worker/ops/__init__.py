"""Operating a running pool: health probes, verification of stored exports, pool gauges.

``health`` (the worker probe), ``verify`` (re-check a job's or batch's stored objects),
``gauges`` (the pool-wide Prometheus gauges read from Redis, and the metrics server),
``redis_access`` (the start-up check of the Redis user's ACL and the server's settings).

May import: ``worker.flow`` and below.
"""
