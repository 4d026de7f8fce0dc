"""Operating the pool through real processes: /metrics moving, probes, the status page.

One stack runs a batch that stays in progress (slow "ready" callbacks for some keys, a cap
on jobs in flight) while the tests scrape the webhook and a worker, probe them, and render
/status in headless Chromium to a screenshot under test-output/.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import requests
from e2e_support import OUTPUT, find_chromium, screenshot
from prometheus_client.parser import text_string_to_metric_families

from worker.cli.stack import LocalStack

pytestmark = pytest.mark.integration

BATCH_ID = "opsbatch"
#: The batch: fast keys that finish, one unknown (fails at once), one APSIS fails (re-requested,
#: then failed), slow keys that stay in flight, and more than max_in_flight lets start.
FAST, SLOW, WAITING = 3, 5, 3
MAX_IN_FLIGHT = SLOW + 1  # the APSIS-failed key is in flight while it is re-requested
SLOW_READY_DELAY = 600.0
TOKEN = secrets.token_urlsafe(32)


@dataclass
class Ops:
    stack: LocalStack
    client: redis.Redis
    before_webhook: dict[str, float]
    before_worker: dict[str, float]


def scrape(url: str) -> dict[str, float]:
    """``name{label="v",...}`` -> value, for every sample of a /metrics answer."""
    answer = requests.get(url, timeout=10)
    answer.raise_for_status()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def _batch(client: redis.Redis) -> dict[str, int]:
    raw: dict[bytes, bytes] = client.hgetall(f"apsis:batch:{BATCH_ID}")  # type: ignore[assignment]
    data = {k.decode(): v.decode() for k, v in raw.items()}
    return {k: int(data.get(k) or 0) for k in ("total", "submitted", "done", "failed")}


@pytest.fixture(scope="module")
def ops(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    base = tmp_path_factory.mktemp("ops")
    stack = LocalStack(
        redis_url=redis_url,
        storage_url=f"file://{base}/exports",
        log_dir=base,
        env={"APSIS_EXPORT_RATE": "50", "STATUS_TOKEN": TOKEN},
    )
    try:
        stack.start()
        worker_url = f"http://127.0.0.1:{stack.worker_metrics_ports[0]}/metrics"
        deadline = time.monotonic() + 30
        while True:  # the worker's metrics thread starts with its pool
            try:
                before_worker = scrape(worker_url)
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        before_webhook = scrape(f"{stack.webhook_url}/metrics")
        requests.patch(
            f"{stack.apsis_url}/_sandbox/config",
            json={"limits": {"export": [100, 1.0], "download": [100, 1.0]}},
            timeout=5,
        ).raise_for_status()
        fast = [f"fast-{n}@example.com" for n in range(FAST)]
        slow = [f"slow-{n}@example.com" for n in range(SLOW)]
        waiting = [f"later-{n}@example.com" for n in range(WAITING)]
        apsis_fails = "apsis-fails@example.com"
        keys = [*fast, "unknown-subject@example.com", apsis_fails, *slow, *waiting]
        stack.sandbox_put(
            "/_sandbox/faults",
            {
                "keys": {
                    **{key: {"ready_delay": SLOW_READY_DELAY} for key in [*slow, *waiting]},
                    apsis_fails: {"failure_code": 500},
                }
            },
        )
        stack.producer.send_task(
            "apsis.export_batch",
            args=[keys],
            kwargs={"batch_id": BATCH_ID, "max_in_flight": MAX_IN_FLIGHT},
            queue="apsis",
        )
        deadline = time.monotonic() + 90
        while True:
            batch = _batch(client)
            # Fast ones done, both failures ended, the slow ones in flight, the rest waiting.
            if batch.get("done") == FAST and batch.get("failed") == 2:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the batch did not reach the expected progress: {batch}")
            time.sleep(0.2)
        yield Ops(stack, client, before_webhook, before_worker)
    finally:
        stack.stop()
        client.flushdb()
        client.close()


def _grew(before: dict[str, float], after: dict[str, float], sample: str, by: float = 1) -> None:
    assert after.get(sample, 0) - before.get(sample, 0) >= by, (
        f"{sample}: {before.get(sample, 0)} -> {after.get(sample)}"
    )


def test_the_webhook_metrics_count_callbacks_and_report_the_pool(ops: Ops) -> None:
    after = scrape(f"{ops.stack.webhook_url}/metrics")
    received = "apsis_export_callbacks_received_total"
    _grew(ops.before_webhook, after, f'{received}{{code="100",outcome="recorded"}}', FAST)
    _grew(ops.before_webhook, after, f'{received}{{code="200",outcome="recorded"}}', FAST)
    _grew(ops.before_webhook, after, f'{received}{{code="500",outcome="recorded"}}', 4)
    # Pool-wide gauges, read from Redis at scrape time.
    assert after['apsis_export_jobs{state="done"}'] == FAST
    assert after['apsis_export_jobs{state="failed"}'] == 2
    assert after['apsis_export_batches{state="running"}'] == 1
    assert after['apsis_export_batch_jobs{state="waiting"}'] >= WAITING
    assert after["apsis_export_inbox_consumers{}"] >= 1
    assert after["apsis_export_redis_up{}"] == 1
    assert 0 < after["apsis_export_deadline_nearest_seconds{}"] <= 7 * 86400
    assert after["apsis_export_oldest_waiting_seconds{}"] > 0


def test_a_worker_metrics_port_shows_its_pool_processes_counters(ops: Ops) -> None:
    after = scrape(f"http://127.0.0.1:{ops.stack.worker_metrics_ports[0]}/metrics")
    requests_ = "apsis_export_apsis_requests_total"
    _grew(ops.before_worker, after, f'{requests_}{{endpoint="export",status="202"}}', FAST + SLOW)
    _grew(ops.before_worker, after, f'{requests_}{{endpoint="export",status="404"}}')
    _grew(ops.before_worker, after, f'{requests_}{{endpoint="download",status="200"}}', FAST)
    _grew(ops.before_worker, after, f'{requests_}{{endpoint="token",status="200"}}')
    _grew(ops.before_worker, after, "apsis_export_stored_bytes_total{}", 100)
    _grew(ops.before_worker, after, "apsis_export_rerequests_total{}", 3)
    _grew(ops.before_worker, after, 'apsis_export_jobs_ended_total{state="done"}', FAST)
    _grew(ops.before_worker, after, 'apsis_export_jobs_ended_total{state="failed"}', 2)
    _grew(ops.before_worker, after, "apsis_export_callback_resume_seconds_count{}", FAST)
    _grew(ops.before_worker, after, 'apsis_export_ratelimit_wait_seconds_count{kind="export"}')
    applied = "apsis_export_callbacks_applied_total"
    _grew(ops.before_worker, after, f'{applied}{{code="200",outcome="ready"}}', FAST)
    _grew(ops.before_worker, after, f'{applied}{{code="500",outcome="rerequested"}}', 3)
    _grew(ops.before_worker, after, f'{applied}{{code="500",outcome="failed"}}')


def test_no_metric_label_carries_a_key_or_an_id(ops: Ops) -> None:
    text = requests.get(f"{ops.stack.webhook_url}/metrics", timeout=10).text
    text += requests.get(
        f"http://127.0.0.1:{ops.stack.worker_metrics_ports[0]}/metrics", timeout=10
    ).text
    assert "@example.com" not in text
    assert BATCH_ID not in text


def test_probes_answer_for_a_running_node(ops: Ops) -> None:
    ready = requests.get(f"{ops.stack.webhook_url}/readyz", timeout=10)
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "checks": {"redis": "ok", "storage": "ok"}}
    probe = [sys.executable, "-m", "worker.cli", "health"]
    ok = subprocess.run(
        probe, check=False, env=ops.stack.env, capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("ok: redis, storage, inbox consumer")
    assert len(ok.stdout.strip().splitlines()) == 1
    other = subprocess.run(
        [*probe, "--node", "no-such-host"],
        check=False,
        env=ops.stack.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert other.returncode == 1
    assert other.stdout.startswith("unhealthy: no inbox consumer heartbeat from no-such-host")


def test_the_status_page_shows_the_batch_in_progress_in_chromium(ops: Ops) -> None:
    url = f"{ops.stack.webhook_url}/status"
    assert requests.get(url, timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer not-the-token"}
    assert requests.get(url, headers=wrong, timeout=10).status_code == 401
    page = requests.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert page.status_code == 200
    html = page.text
    assert BATCH_ID in html
    assert "@example.com" not in html  # no export key, not even of the failed jobs
    assert "APSIS reported failure code 500 (message withheld)" in html
    batch = _batch(ops.client)
    in_flight = batch["submitted"] - batch["done"] - batch["failed"]
    assert in_flight > 0 and batch["submitted"] < batch["total"]  # still in progress

    chromium = find_chromium()
    OUTPUT.mkdir(exist_ok=True)
    saved = OUTPUT / "status.html"
    saved.write_text(html, encoding="utf-8")
    png = OUTPUT / "status.png"
    with tempfile.TemporaryDirectory(prefix="apsis-chromium-") as profile:
        screenshot(chromium, saved, png, window="1280,1400", profile_dir=Path(profile))
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 1400)
    assert len(data) > 20_000  # a rendered page, not a blank one
