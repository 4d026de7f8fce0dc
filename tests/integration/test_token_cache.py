"""The token cache across real processes: 8 workers, one real Redis, one sandbox over HTTP."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from multiprocessing.synchronize import Barrier
from typing import Any

import pytest
import redis

from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from worker.apsis.client import ApsisClient, Limits
from worker.apsis.ratelimit import Limit

pytestmark = pytest.mark.integration

WORKERS = 8
#: Seconds any one step may take before the test gives up on a worker.
STEP_TIMEOUT = 30.0
#: Nobody listens there; the callbacks are dropped by a fault anyway.
CALLBACK_URL = "http://127.0.0.1:9/apsis/callbacks/job"


def worker(
    redis_url: str,
    base_url: str,
    number: int,
    barrier: Barrier,
    results: Any,
) -> None:
    """One worker process: its own client and Redis connection, meeting the others at the
    barrier before each step so they all hit the cache at the same moment."""
    try:
        client = ApsisClient(
            base_url=base_url,
            client_id="sandbox",
            client_secret="sandbox",
            account="sandbox",
            redis_client=redis.Redis.from_url(redis_url),
            # Client pacing out of the way (the documented 10 tokens/min would hold the
            # refresh 6 s after the first fetch); the sandbox still enforces 10/min.
            limits=Limits(
                export=Limit(1000, 1.0),
                download=Limit(1000, 1.0),
                token=Limit(1000, 1.0),
                other=Limit(1000, 1.0),
            ),
        )
        barrier.wait(STEP_TIMEOUT)
        results.put(("token", number, client.tokens.get()))
        barrier.wait(STEP_TIMEOUT)  # the test expires the tokens here
        barrier.wait(STEP_TIMEOUT)
        client.request_export(
            f"KEY-{number}", CALLBACK_URL, history=False, definitions=False, merged=False
        )
        results.put(("export", number, client.tokens.get()))
    except BaseException as exc:
        results.put(("error", number, repr(exc)))
        barrier.abort()


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    config = SandboxConfig(limits={"export": (1000, 1.0)})  # token: the documented 10/min
    with SandboxServer(config) as server:
        yield server


def collect(results: Any, step: str) -> dict[int, str]:
    got: dict[int, str] = {}
    while len(got) < WORKERS:
        kind, number, value = results.get(timeout=STEP_TIMEOUT)
        assert kind == step, f"worker {number}: {value}"
        got[number] = value
    return got


def test_eight_processes_share_one_token_and_refresh_it_once(
    redis_url: str, redis_db: redis.Redis, sandbox: SandboxServer
) -> None:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(WORKERS + 1)
    results = context.Queue()
    processes = [
        context.Process(
            target=worker, args=(redis_url, sandbox.url, n, barrier, results), daemon=True
        )
        for n in range(WORKERS)
    ]
    for process in processes:
        process.start()
    try:
        barrier.wait(STEP_TIMEOUT)  # all ask for the token at once
        first = collect(results, "token")
        assert len(set(first.values())) == 1, "every process got the same token"
        assert len(sandbox.state.journal.entries(kind="token")) == 1

        barrier.wait(STEP_TIMEOUT)
        sandbox.state.set_faults(
            {"default": {"expire_tokens": True, "drop_verify": True, "drop_ready": True}}
        )
        barrier.wait(STEP_TIMEOUT)  # all send an export with the now-expired token
        second = collect(results, "export")

        tokens = sandbox.state.journal.entries(kind="token")
        assert [entry["status"] for entry in tokens] == [200, 200]  # exactly one refresh
        assert len(set(second.values())) == 1
        assert set(second.values()) != set(first.values())
        exports = sandbox.state.journal.entries(kind="export")
        assert sorted(entry["export_key"] for entry in exports if entry["status"] == 202) == [
            f"KEY-{n}" for n in range(WORKERS)
        ]
        assert {entry["status"] for entry in exports} <= {202, 401}
    finally:
        barrier.abort()
        for process in processes:
            process.join(STEP_TIMEOUT)
            if process.is_alive():
                process.kill()
                process.join()
        results.close()
    assert [process.exitcode for process in processes] == [0] * WORKERS
