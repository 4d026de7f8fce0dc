"""The job model: a job, its batch, its callbacks and its lease, as records in Redis.

``jobs`` (the job record and its one state machine, changed by Lua transitions),
``batch_store`` (a batch's record and the bookkeeping a finished job does for it),
``inbox`` (the callback stream and its consumer group; the events stream; consumer
heartbeats), ``lease`` (one worker on a job at a time), ``callback_token`` (the signed
token in a callback URL), ``ids`` (what an export key, a job id and a batch id may be),
``purpose`` (the keyed digest that refuses a reused id for another export),
``control_chars`` (control characters refused in input and escaped in output),
``line`` (the per-account dispatch line every export request waits in).

May import: ``worker.telemetry``, ``worker.config``, ``worker.errors``. Knows nothing of
Celery, Flask, APSIS's HTTP API or storage (an import contract checks it).
"""
