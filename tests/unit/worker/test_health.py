"""worker/ops/health.py: the worker probe's verdict and its one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import fakeredis

from worker.deliverable.storage import Storage
from worker.flow.runtime import Runtime
from worker.model.inbox import Inbox
from worker.ops.health import check_node


def _rt(tmp_path: Path, server: fakeredis.FakeServer) -> Runtime:
    rt = type("Rt", (), {})()
    rt.redis = fakeredis.FakeRedis(server=server)
    rt.inbox = Inbox(rt.redis)
    rt.storage = Storage(f"file://{tmp_path}")
    return cast(Runtime, rt)


def test_a_node_with_a_fresh_heartbeat_is_healthy(tmp_path: Path) -> None:
    server = fakeredis.FakeServer()
    rt = _rt(tmp_path, server)
    rt.inbox.beat("node-a-4242", 995.0)
    rt.inbox.beat("node-b-1", 999.0)
    health = check_node(rt, node="node-a", now=1000.0)
    assert health.ok
    assert health.line == "ok: redis, storage, inbox consumer node-a-4242 5 s ago"


def test_a_stale_or_missing_heartbeat_and_a_dead_redis_are_unhealthy(tmp_path: Path) -> None:
    server = fakeredis.FakeServer()
    rt = _rt(tmp_path, server)
    rt.inbox.beat("node-a-1", 900.0)
    stale = check_node(rt, node="node-a", now=1000.0)
    assert not stale.ok and stale.line.startswith("unhealthy: no inbox consumer heartbeat")
    server.connected = False
    down: Any = check_node(rt, node="node-a", now=1000.0)
    assert not down.ok and down.line == "unhealthy: redis unreachable (ConnectionError)"
