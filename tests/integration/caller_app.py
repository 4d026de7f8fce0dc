"""Another service's Celery app, as a caller would have it: it chains its own task after ours."""

from __future__ import annotations

import json
import os

import redis
from celery import Celery

app = Celery("caller", broker=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.task_serializer = "json"
app.conf.accept_content = ["json"]


@app.task(name="caller.record_result")
def record_result(result: dict, tag: str) -> None:
    """Keep what apsis.export_profile's chain handed us, so the test can look."""
    client = redis.Redis.from_url(app.conf.broker_url)
    client.rpush("caller:results", json.dumps({"result": result, "tag": tag}))
