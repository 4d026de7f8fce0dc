"""A batch is created in one step, and finalized (its caller's chain sent) even when its
finalize is lost, fails on storage, or dies half way (issue 15, items 2 and 4)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from job_support import FeedApsis, make_runtime

from worker.errors import JobIdConflict, StorageError
from worker.flow import batches, feeder, pipeline, watchdog
from worker.flow.batch_file import BatchItem
from worker.flow.runtime import Runtime
from worker.model import batch_store, purpose
from worker.model.batch_store import FINALIZE_TASK, RUNNING_KEY, batch_key
from worker.model.jobs import ExportOptions
from worker.telemetry import metrics

NOW = 1_000_000.0
STUCK = 120.0
CHAIN = {"chain": [{"task": "caller.after_batch", "args": [], "kwargs": {}}], "link": []}
RESCUED = "apsis_export_batches_finalized_by_safety_net_total"


@pytest.fixture
def rt() -> Runtime:
    return make_runtime(
        CALLBACK_BASE_URL="https://hooks.example.com",
        APSIS_EXPORT_RATE="1000",
        WATCHDOG_STUCK_AFTER=STUCK,
        WATCHDOG_INTERVAL=30,
        APSIS_CLIENT_ID="id",
        APSIS_CLIENT_SECRET="Zk8qR2vLx0pW7mN3",
        BATCH_FINALIZE_RETRIES=3,
    )


class Recorder(list[tuple[str, list[Any]]]):
    def __call__(self, name: str, args: list[Any]) -> None:
        self.append((name, args))


class Chains(list[tuple[dict[str, Any], dict[str, Any]]]):
    def __call__(self, chain: dict[str, Any], result: dict[str, Any]) -> None:
        self.append((chain, result))


def _items(*keys: str) -> list[BatchItem]:
    return [BatchItem(k, f"ref-{n}") for n, k in enumerate(keys)]


def _rescued() -> float:
    return metrics.metrics().registry.get_sample_value(RESCUED) or 0.0


def _all_ended(rt: Runtime, batch_id: str, *, submitted: int | None = None) -> None:
    """Every sent item's job ended (as the jobs' transitions count it), finalize not run."""
    batch = rt.batches.get(batch_id)
    sent = batch.total if submitted is None else submitted
    rt.redis.hset(batch_key(batch_id), mapping={"submitted": sent, "failed": sent})


def _sweep(rt: Runtime, at: float) -> tuple[watchdog.SweepReport, Recorder]:
    sent = Recorder()
    report = watchdog.sweep(rt, sent, lambda c, r: None, now=at)
    return report, sent


# -- item 4: creation is one step ---------------------------------------------------------


def test_a_batch_left_creating_by_an_interrupted_create_is_finished_by_the_repeat(
    rt: Runtime,
) -> None:
    items = _items("ann@example.com", "bob@example.com")
    digests = purpose.batch_digests(
        rt.jobs.secrets,
        export_keys=(i.export_key for i in items),
        options=ExportOptions().to_json(),
        account=rt.settings.APSIS_ACCOUNT,
    )
    # What a process that died (or lost Redis) between claiming the id and the rest left.
    rt.redis.hset(batch_key("B"), mapping={"state": "creating", "purpose": digests[0]})

    # The redelivered call finishes the creation: the batch runs, is fed and summarised.
    assert batches.create(rt, "B", items, options=ExportOptions(), chain=CHAIN)
    batch = rt.batches.get("B")
    assert (batch.state, batch.total, batch.submitted) == ("running", 2, 0)
    assert rt.batches.running_ids() == ["B"]
    assert json.loads(rt.redis.lindex(batch_store.items_key("B"), 1)) == [  # type: ignore[arg-type]
        "bob@example.com",
        "ref-1",
    ]
    # A third call is an idempotent repeat; another batch under the id is still refused.
    assert not batches.create(rt, "B", items, options=ExportOptions())
    with pytest.raises(JobIdConflict):
        batches.create(rt, "B", _items("eve@example.com"), options=ExportOptions())


def test_an_unfinished_creation_under_another_purpose_is_refused_not_overwritten(
    rt: Runtime,
) -> None:
    rt.redis.hset(batch_key("B"), mapping={"state": "creating", "purpose": "other"})
    with pytest.raises(JobIdConflict):
        batches.create(rt, "B", _items("ann@example.com"), options=ExportOptions())
    assert rt.redis.hget(batch_key("B"), "state") == b"creating"
    assert rt.batches.running_ids() == []


def test_a_large_batch_is_created_whole_with_each_keys_first_index(rt: Runtime) -> None:
    keys = [f"p{n}@example.com" for n in range(2500)] + ["p7@example.com"]
    assert batches.create(rt, "big", _items(*keys), options=ExportOptions())
    batch = rt.batches.get("big")
    assert (batch.total, batch.state) == (2501, "running")
    assert rt.redis.llen(batch_store.items_key("big")) == 2501
    assert rt.redis.hlen(batch_store.index_key("big")) == 2500
    assert rt.redis.hget(batch_store.index_key("big"), "p7@example.com") == b"7"
    assert rt.redis.hget(batch_store.index_key("big"), "p2499@example.com") == b"2499"


# -- item 2: the safety net ---------------------------------------------------------------


def test_a_complete_batch_whose_finalize_was_lost_is_finalized_by_the_sweep_once(
    rt: Runtime,
) -> None:
    apsis = FeedApsis()
    rt._clients[rt.settings.APSIS_ACCOUNT] = apsis
    account = rt.settings.APSIS_ACCOUNT
    assert batches.create(rt, "B", _items("ann@example.com"), options=ExportOptions(), chain=CHAIN)
    assert feeder.serve(rt, account, lambda *a: None, slice_seconds=1.0) is None
    assert apsis.requested == ["ann@example.com"]
    # Its one job ends; the finalize that would have been dispatched is lost (rt.dispatch
    # is None here: nothing is sent, as when the process died right after the transition).
    assert pipeline.fail(rt, "B.0", "APSIS said no")
    assert rt.batches.get("B").complete
    now = time.time()
    for _ in range(3):  # feeders keep passing over it: that must hide nothing
        assert feeder.serve(rt, account, lambda *a: None, slice_seconds=1.0) is None

    # A finalize under way gets its time: the first look only notes the batch complete.
    report, sent = _sweep(rt, now + STUCK + 1)
    assert sent == [] and report.batches_finalized == []
    report, sent = _sweep(rt, now + 2 * STUCK + 2)
    assert sent == [(FINALIZE_TASK, ["B"])] and report.batches_finalized == ["B"]

    before = _rescued()
    chains = Chains()
    assert batches.finalize(rt, "B", chains)
    assert rt.batches.get("B").state == "done"
    assert [(c, r["failed"]) for c, r in chains] == [(CHAIN, 1)]
    assert _rescued() == before + 1
    # Nothing left to do: no more sweeps act, a repeated finalize sends nothing.
    assert not batches.finalize(rt, "B", chains)
    assert _sweep(rt, now + 10 * STUCK)[1] == []
    assert len(chains) == 1 and rt.batches.running_ids() == []


def test_a_cancelled_batch_stays_under_the_safety_net_until_finalized(rt: Runtime) -> None:
    items = _items("ann@example.com", "bob@example.com")
    assert batches.create(rt, "B", items, options=ExportOptions(), chain=CHAIN)
    rt.redis.zadd(RUNNING_KEY, {"B": NOW})
    rt.redis.hset(batch_key("B"), "submitted", 1)
    assert batches.cancel(rt, "B")
    assert not batches.cancel(rt, "B")
    _all_ended(rt, "B", submitted=1)  # its one sent job ended; that finalize was lost

    _sweep(rt, NOW + STUCK + 1)
    _, sent = _sweep(rt, NOW + 2 * STUCK + 2)
    assert sent == [(FINALIZE_TASK, ["B"])]
    chains = Chains()
    assert batches.finalize(rt, "B", chains)
    batch = rt.batches.get("B")
    assert batch.state == "cancelled" and batch.is_final
    assert [r["state"] for _, r in chains] == ["cancelled"]


def test_the_chain_is_sent_by_a_rerun_if_the_finalizer_died_before_sending_it(
    rt: Runtime,
) -> None:
    assert batches.create(rt, "B", _items("ann@example.com"), options=ExportOptions(), chain=CHAIN)
    rt.redis.zadd(RUNNING_KEY, {"B": NOW})
    _all_ended(rt, "B")

    def dies(chain: dict[str, Any], result: dict[str, Any]) -> None:
        raise SystemExit("killed")

    with pytest.raises(SystemExit):
        batches.finalize(rt, "B", dies)
    assert rt.batches.get("B").is_final  # manifest written, the chain not sent

    _sweep(rt, NOW + STUCK + 1)
    _, sent = _sweep(rt, NOW + 2 * STUCK + 2)
    assert sent == [(FINALIZE_TASK, ["B"])]
    chains = Chains()
    batches.finalize(rt, "B", chains)
    batches.finalize(rt, "B", chains)
    assert len(chains) == 1
    chain, result = chains[0]
    assert chain == CHAIN and result["state"] == "done" and result["batch_id"] == "B"
    assert result["manifest"].endswith("batches/B/manifest.json")


def test_a_finalize_failing_on_storage_is_retried_with_backoff_then_left_to_the_sweep(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert batches.create(rt, "B", _items("ann@example.com"), options=ExportOptions(), chain=CHAIN)
    _all_ended(rt, "B")

    def unwritable(*args: Any, **kwargs: Any) -> None:
        raise StorageError("batches/B/summary.csv: permission denied")

    monkeypatch.setattr(rt.storage, "put_file", unwritable)
    chains = Chains()
    delays = []
    for retries in range(3):  # BATCH_FINALIZE_RETRIES
        with pytest.raises(pipeline.RetryLater) as later:
            batches.finalize_or_retry(rt, "B", chains, retries=retries)
        delays.append(later.value.delay)
    assert delays[0] <= pipeline.BACKOFF_BASE < delays[2]  # it backs off
    # Retries spent: the task ends; the batch is still under the sweep's net.
    assert not batches.finalize_or_retry(rt, "B", chains, retries=3)
    assert rt.batches.running_ids() == ["B"] and not rt.batches.get("B").is_final

    monkeypatch.undo()  # storage is back
    assert batches.finalize_or_retry(rt, "B", chains, retries=0)
    assert len(chains) == 1 and rt.batches.get("B").state == "done"
