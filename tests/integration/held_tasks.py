"""A test-only task that notes which node started it and when, then holds its pool process.

Loaded by the workers of test_fault_node_lost.py through CELERY_EXTRA_INCLUDE (with this
folder on PYTHONPATH); the product never loads it.
"""

from __future__ import annotations

import json
import time
from typing import Any

from celery import shared_task

from worker.flow.runtime import get_runtime

#: The Redis list each start is appended to: {"tag", "node", "at"}.
STARTS = "itest:hold:starts"
HOLD_TASK = "itest.hold"


@shared_task(name=HOLD_TASK, bind=True)
def hold(self: Any, tag: str, seconds: float) -> None:
    start = {"tag": tag, "node": self.request.hostname, "at": time.time()}
    get_runtime().redis.rpush(STARTS, json.dumps(start))
    time.sleep(seconds)
