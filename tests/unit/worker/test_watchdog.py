"""worker/flow/watchdog.py: lost callbacks re-requested, deadlines enforced, stuck jobs resumed."""

from __future__ import annotations

from typing import Any

import pytest
from job_support import make_runtime

from worker.flow import pipeline, watchdog
from worker.flow.runtime import Runtime
from worker.model.jobs import ExportOptions, State
from worker.model.lease import LEASE_SECONDS, JobLease, LeaseBusy

NOW = 1_000_000.0


@pytest.fixture
def rt() -> Runtime:
    return make_runtime(
        APSIS_CALLBACK_TIMEOUT=600,
        EXPORT_DEADLINE=86400,
        WATCHDOG_STUCK_AFTER=120,
        WATCHDOG_INTERVAL=30,
    )


class Recorder(list[tuple[str, list[Any]]]):
    """What the sweep dispatched: task name and job id (a fetch also carries its slot)."""

    def __call__(self, name: str, args: list[Any]) -> None:
        self.append((name, args[:1]))


def _new(rt: Runtime, job_id: str, *, at: float = NOW, chain: dict | None = None) -> None:
    rt.jobs.create(
        job_id,
        export_key=f"{job_id}@example.com",
        account=rt.settings.APSIS_ACCOUNT,
        options=ExportOptions(),
        deadline_seconds=rt.settings.EXPORT_DEADLINE,
        chain=chain,
        now=at,
    )


def test_a_lost_callback_is_rerequested_with_a_new_attempt(rt: Runtime) -> None:
    _new(rt, "lost")
    rt.jobs.transition("lost", State.REQUESTED, waiting_until=NOW + 600, now=NOW)
    sent = Recorder()
    assert watchdog.sweep(rt, sent, lambda c, r: None, now=NOW + 599).rerequested == []
    report = watchdog.sweep(rt, sent, lambda c, r: None, now=NOW + 601)
    assert report.rerequested == ["lost"]
    job = rt.jobs.get("lost")
    assert (job.state, job.attempt) == (State.QUEUED, 2)
    assert sent == [(pipeline.REQUEST_TASK, ["lost"])]


def test_after_the_last_attempt_a_lost_callback_fails_the_job(rt: Runtime) -> None:
    _new(rt, "gone")
    for _ in range(pipeline.MAX_ATTEMPTS - 1):
        rt.jobs.transition("gone", State.REQUESTED, now=NOW)
        rt.jobs.transition("gone", State.QUEUED, new_attempt=True, now=NOW)
    rt.jobs.transition("gone", State.REQUESTED, waiting_until=NOW + 600, now=NOW)
    report = watchdog.sweep(rt, Recorder(), lambda c, r: None, now=NOW + 601)
    assert report.failed == ["gone"]
    job = rt.jobs.get("gone")
    assert job.state == State.FAILED
    assert "no ready callback" in (job.error or "")
    assert b'"state": "failed"' in rt.storage.get_bytes("jobs/gone/manifest.json")


def test_a_job_past_its_overall_deadline_fails_with_the_reason(rt: Runtime) -> None:
    _new(rt, "late")
    rt.jobs.transition("late", State.REQUESTED, waiting_until=NOW + 10**9, now=NOW)
    report = watchdog.sweep(rt, Recorder(), lambda c, r: None, now=NOW + 86401)
    assert report.failed == ["late"]
    assert "EXPORT_DEADLINE" in (rt.jobs.get("late").error or "")


def test_stuck_jobs_are_dispatched_again_unless_leased_or_retry_due(rt: Runtime) -> None:
    _new(rt, "queued")  # the request task was lost
    _new(rt, "ready")
    rt.jobs.transition("ready", State.REQUESTED, now=NOW)
    rt.jobs.transition("ready", State.READY, fields={"download_url": "u"}, now=NOW)
    _new(rt, "leased")
    rt.jobs.transition("leased", State.REQUESTED, now=NOW)
    rt.jobs.transition("leased", State.READY, now=NOW)
    _new(rt, "retrying")
    rt.jobs.update("retrying", {"retry_at": NOW + 10_000})
    sent = Recorder()
    with JobLease(rt.redis, "leased"):
        with pytest.raises(LeaseBusy):
            JobLease(rt.redis, "leased").__enter__()
        assert watchdog.sweep(rt, sent, lambda c, r: None, now=NOW + 60).redispatched == []
        report = watchdog.sweep(rt, sent, lambda c, r: None, now=NOW + 121)
    assert sorted(report.redispatched) == ["queued", "ready"]
    assert sorted(sent) == [(pipeline.FETCH_TASK, ["ready"]), (pipeline.REQUEST_TASK, ["queued"])]
    # Re-dispatching counts as activity: the next sweep gives those tasks time to run; the
    # job whose lease has now ended (its worker "died") is picked up.
    assert watchdog.sweep(rt, sent, lambda c, r: None, now=NOW + 122).redispatched == ["leased"]


def test_a_done_job_whose_chain_was_never_sent_gets_it_sent_once(rt: Runtime) -> None:
    stored = {"chain": [{"task": "caller.next"}], "link": []}
    _new(rt, "done", chain=stored)
    rt.jobs.transition("done", State.REQUESTED, now=NOW)
    rt.jobs.transition("done", State.READY, now=NOW)
    rt.jobs.transition("done", State.DONE, fields={"manifest": "m"}, now=NOW)
    chains: list[tuple[dict, dict]] = []
    report = watchdog.sweep(rt, Recorder(), lambda c, r: chains.append((c, r)), now=NOW + 121)
    assert report.chains_resumed == ["done"]
    assert chains[0][0] == stored
    assert chains[0][1]["job_id"] == "done"
    assert watchdog.sweep(rt, Recorder(), lambda c, r: chains.append((c, r)), now=NOW + 999)
    assert len(chains) == 1


def test_only_one_sweep_per_interval_in_the_whole_pool(rt: Runtime) -> None:
    assert watchdog.try_sweep(rt, Recorder(), lambda c, r: None) is not None
    assert watchdog.try_sweep(rt, Recorder(), lambda c, r: None) is None


def test_a_fetch_whose_worker_stopped_beating_is_resumed_within_a_lease(rt: Runtime) -> None:
    for job_id in ("orphan", "alive", "waiting", "not_started"):
        _new(rt, job_id)
        rt.jobs.transition(job_id, State.REQUESTED, now=NOW)
        rt.jobs.transition(job_id, State.READY, fields={"download_url": "u"}, now=NOW)
    for job_id in ("orphan", "alive", "waiting"):
        rt.jobs.update(job_id, {"fetch_started_at": NOW})  # a fetch began on each
    rt.jobs.update("waiting", {"retry_at": NOW + 1000})  # told to come back later
    sent = Recorder()
    with JobLease(rt.redis, "alive"):  # a slow fetch whose worker still beats
        early = watchdog.sweep(rt, sent, lambda c, r: None, now=NOW + LEASE_SECONDS - 1)
        report = watchdog.sweep(rt, sent, lambda c, r: None, now=NOW + LEASE_SECONDS + 1)

    assert early.redispatched == []
    # Long before WATCHDOG_STUCK_AFTER (120 s here): only the fetch nobody holds any more.
    assert report.redispatched == ["orphan"]
    assert sent == [(pipeline.FETCH_TASK, ["orphan"])]
