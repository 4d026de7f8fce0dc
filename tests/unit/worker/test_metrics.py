"""worker/telemetry/metrics.py: what the counters record, the pool gauges read from Redis, no ids"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from prometheus_client.core import Metric

from worker.model.inbox import Inbox
from worker.model.jobs import ExportOptions, JobStore, State
from worker.ops import gauges
from worker.telemetry import metrics


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    for family in metrics.metrics().registry.collect():
        for sample in family.samples:
            if sample.name == name and sample.labels == (labels or {}):
                return float(sample.value)
    return 0.0


def test_an_apsis_call_is_counted_by_status_or_as_an_error() -> None:
    labels = {"endpoint": "export", "status": "202"}
    before = _sample("apsis_export_apsis_requests_total", labels)
    answer = type("Answer", (), {"status_code": 202})
    response = metrics.timed_apsis_call("export", answer)
    assert response.status_code == 202
    assert _sample("apsis_export_apsis_requests_total", labels) == before + 1

    errors = {"endpoint": "download", "status": "error"}
    before = _sample("apsis_export_apsis_requests_total", errors)

    def boom() -> Any:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        metrics.timed_apsis_call("download", boom)
    assert _sample("apsis_export_apsis_requests_total", errors) == before + 1


def test_a_job_ending_is_counted_once_and_failures_are_listed() -> None:
    jobs = JobStore(fakeredis.FakeRedis())
    jobs.create("f1", export_key="k", account="a", options=ExportOptions(), deadline_seconds=60)
    before = _sample("apsis_export_jobs_ended_total", {"state": "failed"})
    assert jobs.transition("f1", State.FAILED, fields={"error": "x"})[0]
    assert not jobs.transition("f1", State.FAILED)[0]  # a no-op is not counted
    assert _sample("apsis_export_jobs_ended_total", {"state": "failed"}) == before + 1
    assert jobs.recent_failures() == ["f1"]


def _gauges(client: fakeredis.FakeRedis, now: float) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    family: Metric
    for family in gauges.PoolCollector(client, now=lambda: now).collect():
        found[family.name] = [(s.labels, s.value) for s in family.samples]
    return found


def test_pool_gauges_come_from_redis_without_any_id_or_key() -> None:
    client = fakeredis.FakeRedis()
    jobs = JobStore(client)
    jobs.create(
        "w1",
        export_key="person@example.com",
        account="a",
        options=ExportOptions(),
        deadline_seconds=100,
        now=1000.0,
    )
    jobs.transition("w1", State.REQUESTED, waiting_until=5000.0, now=1000.0)
    Inbox(client).append(job_id="w1", attempt=1, code=100, message="m")
    Inbox(client).beat("host-1", 1040.0)
    gauges = _gauges(client, now=1050.0)
    assert ({"state": "requested"}, 1) in gauges["apsis_export_jobs"]
    assert gauges["apsis_export_oldest_waiting_seconds"] == [({}, 50.0)]
    assert gauges["apsis_export_deadline_nearest_seconds"] == [({}, 50.0)]
    assert gauges["apsis_export_jobs_due_soon"] == [({}, 1)]
    assert gauges["apsis_export_inbox_backlog"] == [({}, 1)]
    assert gauges["apsis_export_inbox_consumers"] == [({}, 1)]
    assert gauges["apsis_export_redis_up"] == [({}, 1)]
    text = repr(gauges)
    assert "w1" not in text and "example.com" not in text


def test_pool_gauges_say_redis_is_down_instead_of_failing_the_scrape() -> None:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    server.connected = False
    assert _gauges(client, now=0.0) == {"apsis_export_redis_up": [({}, 0)]}


def test_prepare_multiprocess_uses_a_fresh_dir_and_empties_a_given_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # setenv first, so that teardown restores the variable's original absence.
    monkeypatch.setenv(metrics.MULTIPROC_ENV, "placeholder")
    monkeypatch.delenv(metrics.MULTIPROC_ENV)
    made = metrics.prepare_multiprocess("test")
    assert os.path.isdir(made) and os.environ[metrics.MULTIPROC_ENV] == made
    stale = tmp_path / "counter_123.db"
    stale.write_bytes(b"old")
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(tmp_path))
    assert metrics.prepare_multiprocess("test") == str(tmp_path)
    assert not stale.exists()
