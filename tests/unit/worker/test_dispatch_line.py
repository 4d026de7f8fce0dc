"""One road to APSIS: the per-account dispatch line and the feeder that serves it.

Unit level (fake Redis, a fake APSIS client at a high rate so slots come fast): the order
requests leave in, the share batches keep while singles wait, the round robin between
batches, retries that wait in line, and a dead feeder's requests coming back.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from job_support import FeedApsis, make_runtime

from worker.errors import ApsisAuthError
from worker.flow import batches, feeder, pipeline, watchdog
from worker.flow.batch_file import BatchItem
from worker.flow.runtime import Runtime
from worker.model.jobs import ExportOptions, State
from worker.model.line import DispatchLine

ACCOUNT = "default"


def _rt(apsis: FeedApsis) -> Runtime:
    rt = make_runtime(
        CALLBACK_BASE_URL="https://hooks.example.com",
        APSIS_CLIENT_ID="client-id",
        APSIS_CLIENT_SECRET="client-secret",
    )
    rt._clients[ACCOUNT] = apsis
    return rt


def _single(rt: Runtime, key: str, *, urgent: bool = False) -> str:
    job_id = key.split("@", maxsplit=1)[0]
    pipeline.submit(rt, key, options=ExportOptions(), job_id=job_id, urgent=urgent)
    assert pipeline.place_in_line(rt, job_id)
    return job_id


def _serve_all(rt: Runtime, later: list[Any] | None = None) -> None:
    """Serve the account the way a feeder thread does, until nothing of it waits."""
    for _ in range(50):
        again = feeder.serve(rt, ACCOUNT, lambda *a: (later or []).append(a))
        if again is None and not any(rt.line.lengths(ACCOUNT).values()):
            return
        time.sleep(again or feeder.FEED_IDLE)


def test_the_line_is_first_in_first_out_with_urgent_ahead() -> None:
    apsis = FeedApsis()
    rt = _rt(apsis)
    for key in ("s1@x.test", "s2@x.test", "s3@x.test"):
        _single(rt, key)
    _single(rt, "u1@x.test", urgent=True)

    assert not pipeline.place_in_line(rt, "s2")  # in line already: once only
    place = rt.line.place(ACCOUNT, "s3")
    assert place is not None and (place.lane, place.ahead) == ("single", 3)
    _serve_all(rt)

    assert apsis.requested == ["u1@x.test", "s1@x.test", "s2@x.test", "s3@x.test"]
    assert all(rt.jobs.get(j).state == State.REQUESTED for j in ("s1", "s2", "s3", "u1"))
    assert rt.line.lengths(ACCOUNT) == {"urgent": 0, "single": 0, "batch": 0, "later": 0}
    assert rt.line.place(ACCOUNT, "s3") is None


def test_singles_go_first_but_a_running_batch_keeps_one_slot_in_four() -> None:
    apsis = FeedApsis()
    rt = _rt(apsis)
    items = [BatchItem(f"b{n}@x.test") for n in range(6)]
    assert batches.create(rt, "B", items, options=ExportOptions())
    for n in range(7):
        _single(rt, f"s{n}@x.test")
    _serve_all(rt)

    order = [k[0] for k in apsis.requested]
    assert order == list("sssbsssbsbbbb")


def test_two_batches_share_the_slots_in_turn() -> None:
    apsis = FeedApsis()
    rt = _rt(apsis)
    assert batches.create(
        rt, "A", [BatchItem(f"a{n}@x.test") for n in range(4)], options=ExportOptions()
    )
    assert batches.create(
        rt, "B", [BatchItem(f"b{n}@x.test") for n in range(4)], options=ExportOptions()
    )
    _serve_all(rt)

    order = [k[0] for k in apsis.requested]
    assert sorted(order) == list("aaaabbbb")
    assert order[:6] in (list("ababab"), list("bababa"))


def test_a_429_waits_in_line_and_keeps_its_place_no_task_retries() -> None:
    apsis = FeedApsis(busy_once={"s1@x.test"})
    rt = _rt(apsis)
    for key in ("s1@x.test", "s2@x.test"):
        _single(rt, key)
    later: list[Any] = []

    feeder.serve(rt, ACCOUNT, lambda *a: later.append(a), slice_seconds=0.1)
    assert apsis.requested == ["s2@x.test"]
    place = rt.line.place(ACCOUNT, "s1")
    assert place is not None and place.retry_at is not None  # waiting for its retry, in line
    assert rt.jobs.get("s1").state == State.QUEUED

    _serve_all(rt, later)
    assert apsis.requested == ["s2@x.test", "s1@x.test"]
    assert later == []  # nothing went through a Celery countdown
    assert rt.jobs.get("s1").retries == 1


def test_a_request_a_dead_feeder_took_comes_back_to_its_place() -> None:
    rt = _rt(FeedApsis())
    line = DispatchLine(rt.redis)
    for key in ("s1@x.test", "s2@x.test"):
        _single(rt, key)
    assert line.take(ACCOUNT, "single", now=1000.0) == "s1"  # ...and its feeder died

    assert line.recover_taken(ACCOUNT, taken_before=1000.0 + feeder.TAKEN_STALE) == ["s1"]
    place = line.place(ACCOUNT, "s1")
    assert place is not None and place.ahead == 0  # first again, ahead of s2


def test_a_job_waiting_in_line_is_not_a_watchdog_rescue() -> None:
    rt = _rt(FeedApsis())
    _single(rt, "s1@x.test")
    sent: list[Any] = []
    late = rt.jobs.get("s1").created_at + rt.settings.WATCHDOG_STUCK_AFTER + 1

    report = watchdog.sweep(rt, lambda *a: sent.append(a), lambda c, r: None, now=late)

    assert report.redispatched == [] and sent == []


def test_status_tells_a_waiting_request_its_place_and_about_when_it_leaves() -> None:
    rt = _rt(FeedApsis())
    for n in range(3):
        _single(rt, f"s{n}@x.test")
    place = feeder.place_of(rt, rt.jobs.get("s2"))
    assert place is not None
    assert (place["lane"], place["ahead"]) == ("single", 2)
    assert place["eta_seconds"] is not None and place["eta_seconds"] >= 0


def test_the_gauges_and_the_status_page_show_the_line() -> None:
    from webhook.status import gather
    from worker.ops.gauges import PoolCollector

    rt = _rt(FeedApsis())
    for n in range(3):
        _single(rt, f"s{n}@x.test")
    families = {f.name: f for f in PoolCollector(rt.redis).collect()}
    samples = {
        tuple(sorted(s.labels.items())): s.value
        for s in families["apsis_export_line_requests"].samples
    }
    assert samples[(("account", ACCOUNT), ("lane", "single"))] == 3
    assert samples[(("account", ACCOUNT), ("lane", "urgent"))] == 0

    page = gather(rt.redis, time.time())
    assert [(r["account"], r["lane"], r["waiting"]) for r in page["lines"]] == [
        (ACCOUNT, "single", 3)
    ]


class _RefusedTokens:
    def get(self) -> str:
        raise ApsisAuthError("APSIS token: answered a redirect (HTTP 307); not followed")


def test_when_apsis_refuses_the_token_every_waiting_request_fails_with_the_reason() -> None:
    apsis = FeedApsis()
    apsis.tokens = _RefusedTokens()
    rt = _rt(apsis)
    for key in ("s1@x.test", "s2@x.test"):
        _single(rt, key)

    _serve_all(rt)

    for job_id in ("s1", "s2"):
        job = rt.jobs.get(job_id)
        assert job.state == State.FAILED
        assert job.error is not None and "redirect" in job.error
    assert apsis.requested == []
    assert rt.line.lengths(ACCOUNT) == {"urgent": 0, "single": 0, "batch": 0, "later": 0}


class CallsBackAtOnce(FeedApsis):  # type: ignore[misc]
    """APSIS sends a failure callback for the first request before its 202 is recorded."""

    def __init__(self, rt_box: list[Runtime]) -> None:
        super().__init__()
        self._rt = rt_box
        self.failed_once = False

    def request_export(self, export_key: str, callback_url: str, **kwargs: Any) -> None:
        super().request_export(export_key, callback_url, **kwargs)
        if not self.failed_once:
            self.failed_once = True
            rt = self._rt[0]
            job = rt.jobs.get("s1")

            # The consumer applies it: a new attempt, whose request goes in line.
            def in_line(_name: str, args: list[Any]) -> None:
                pipeline.place_in_line(rt, args[0])

            assert pipeline.rerequest(rt, job, "APSIS reported failure code 500", in_line)


def test_a_re_request_that_races_its_own_send_is_not_dropped_from_the_line() -> None:
    box: list[Runtime] = []
    apsis = CallsBackAtOnce(box)
    rt = _rt(apsis)
    box.append(rt)
    _single(rt, "s1@x.test")

    _serve_all(rt)

    assert apsis.requested == ["s1@x.test", "s1@x.test"]  # the second attempt was sent too
    job = rt.jobs.get("s1")
    assert (job.state, job.attempt) == (State.REQUESTED, 2)


def test_an_account_leaves_the_feeders_list_only_when_nothing_of_it_waits() -> None:
    rt = _rt(FeedApsis())
    _single(rt, "s1@x.test")
    rt.line.forget_account_if_idle(ACCOUNT)
    assert rt.line.accounts() == [ACCOUNT]  # s1 waits: the feeders must keep looking
    assert rt.line.take(ACCOUNT, "single") == "s1"
    rt.line.sent(ACCOUNT, "s1")
    rt.line.forget_account_if_idle(ACCOUNT)
    assert rt.line.accounts() == []


def _ready(rt: Runtime, job_id: str, *, batch_id: str | None = None) -> None:
    rt.jobs.create(
        job_id,
        export_key=f"{job_id}@x.test",
        account=ACCOUNT,
        options=ExportOptions(),
        deadline_seconds=3600,
        batch_id=batch_id,
    )
    rt.jobs.transition(job_id, State.REQUESTED)
    rt.jobs.transition(job_id, State.READY, fields={"download_url": "https://x/y"})


def _serve_downloads(rt: Runtime, dispatched: list[str], state: Any = None) -> float | None:
    def record(name: str, args: list[Any], countdown: float) -> None:
        assert name == pipeline.FETCH_TASK and countdown == 0.0
        assert abs(args[1] - time.time()) < 1.0  # the reserved slot's time goes along
        dispatched.append(args[0])

    return feeder.serve_downloads(rt, ACCOUNT, record, state, slice_seconds=2.0)


def test_downloads_leave_in_order_singles_first_and_only_two_wait_for_a_worker() -> None:
    """The download line: fetches leave at download slots, singles ahead of batch items
    (which keep one slot in four), and no more than FETCH_AHEAD wait for a worker."""
    rt = _rt(FeedApsis())
    for job_id in ("b1", "b2"):
        _ready(rt, job_id, batch_id="batch")
        rt.fetches.enqueue(ACCOUNT, job_id, "batch")
    for job_id in ("s1", "s2", "s3", "s4"):
        _ready(rt, job_id)
        rt.fetches.enqueue(ACCOUNT, job_id, "single")

    dispatched: list[str] = []
    state = feeder._Account()  # what the feeder thread keeps between slices
    while rt.fetches.lengths(ACCOUNT)["single"] + rt.fetches.lengths(ACCOUNT)["batch"]:
        before = len(dispatched)
        _serve_downloads(rt, dispatched, state)
        # The pool is busy: two fetches dispatched and not begun, the rest wait in line.
        assert len(dispatched) - before <= pipeline.FETCH_AHEAD
        assert rt.fetches.taken_count(ACCOUNT) <= pipeline.FETCH_AHEAD
        for job_id in dispatched[before:]:
            rt.fetches.sent(ACCOUNT, job_id)  # what a fetch task does when it begins

    assert dispatched == ["s1", "s2", "s3", "b1", "s4", "b2"]


def test_a_fetch_told_not_now_waits_out_of_the_way_then_leaves_again() -> None:
    rt = _rt(FeedApsis())
    _ready(rt, "s1")
    pipeline.download_later(rt, "s1", 0.3)  # APSIS answered 503 to its download
    place = rt.fetches.place(ACCOUNT, "s1")
    assert place is not None and place.retry_at is not None

    dispatched: list[str] = []
    again = _serve_downloads(rt, dispatched)
    assert dispatched == [] and again is not None and again <= feeder.FEED_IDLE
    time.sleep(0.35)
    _serve_downloads(rt, dispatched)
    assert dispatched == ["s1"]


def test_a_fetch_dispatched_and_never_begun_is_dispatched_again() -> None:
    """Its message went with a node that died: the job goes back to its place after
    FETCH_TAKEN_STALE and leaves again; nothing waits for WATCHDOG_STUCK_AFTER."""
    rt = _rt(FeedApsis())
    _ready(rt, "s1")
    line = DispatchLine(rt.redis, prefix=rt.fetches.prefix)
    line.enqueue(ACCOUNT, "s1", "single")
    assert line.take(ACCOUNT, "single", now=time.time() - feeder.FETCH_TAKEN_STALE - 1) == "s1"

    dispatched: list[str] = []
    _serve_downloads(rt, dispatched)
    assert dispatched == ["s1"]


def test_status_gauges_and_page_show_a_fetch_waiting_in_the_download_line() -> None:
    from webhook.status import gather
    from worker.ops.gauges import PoolCollector

    rt = _rt(FeedApsis())
    for job_id in ("s1", "s2"):
        _ready(rt, job_id)
        rt.fetches.enqueue(ACCOUNT, job_id, "single")

    place = feeder.place_of(rt, rt.jobs.get("s2"))
    assert place is not None
    assert (place["line"], place["lane"], place["ahead"]) == ("download", "single", 1)
    interval = FeedApsis().limits.download.interval
    assert place["eta_seconds"] == round(2 * interval, 1)

    families = {f.name: f for f in PoolCollector(rt.redis).collect()}
    samples = {
        tuple(sorted(s.labels.items())): s.value
        for s in families["apsis_export_download_line_requests"].samples
    }
    assert samples[(("account", ACCOUNT), ("lane", "single"))] == 2
    page = gather(rt.redis, time.time())
    assert [(r["line"], r["lane"], r["waiting"]) for r in page["lines"]] == [
        ("downloads", "single", 2)
    ]


class _RedisGoneOnce(FeedApsis):  # type: ignore[misc]
    """Redis goes away (a failover) while the first request is being sent."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def request_export(self, export_key: str, callback_url: str, **kwargs: Any) -> None:
        if not self.failed:
            self.failed = True
            raise redis.ConnectionError("Connection closed by server.")
        super().request_export(export_key, callback_url, **kwargs)


def test_a_request_interrupted_by_a_redis_outage_is_back_in_line_at_once() -> None:
    """Not after TAKEN_STALE (30 s): as soon as Redis answers again, about a second."""
    apsis = _RedisGoneOnce()
    rt = _rt(apsis)
    _single(rt, "s1@x.test")
    _serve_all(rt)  # serves until nothing waits (a request left taken would not count)
    assert apsis.requested == ["s1@x.test"]
    assert rt.jobs.get("s1").state == State.REQUESTED
