"""What the pool counts and logs: metric declarations and JSON log lines.

``metrics`` (every counter and histogram, declared once; multiprocess-safe), ``logs``
(the JSON formatter, key references instead of export keys).

May import: ``worker.config``, ``worker.errors``. Reads nothing from Redis (the pool gauges
that do live in ``worker.ops.gauges``).
"""
