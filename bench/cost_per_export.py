"""Cost per export: CPU ms summed over every process of the pool, and Redis bytes per waiting job,
beside the floor: one process doing the same HTTP calls with no queue.

Run: python -m bench.cost_per_export [exports]. The pool's CPU is read from /proc for every
process in the webhook's and the workers' process groups (gunicorn master and workers, the
celery main process with its inbox consumer, the pool children); the sandbox runs in this
process and is not counted, nor is this process. The floor runs as its own process (python
-m bench.cost_per_export --floor ...) and reports its own CPU time: token once, then per
export POST export-single with a callback URL on a tiny in-process HTTP server, wait for
the 200 callback, GET the download into a file while hashing it, then the same deliverable
the product makes, by the same code (``worker.deliverable``: split per export key, the
report, the package, the manifest), stored in a ``file://`` store as the pool's is. So the
ratio measures the machinery alone: queue, job store, lines, webhook, inbox. The
deliverable's own CPU is reported beside it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

import requests

from bench.report import (
    bench_stack,
    counts,
    emit,
    group_cpu_seconds,
    pid_cpu_seconds,
    redis_of,
    redis_server_pid,
    stack_groups,
    used_memory,
    wait_until,
)

EXPORTS = 2000
#: Jobs parked waiting (the sandbox drops their ready callback) for the memory figure.
WAITING = 2000
WARMUP = 20
GOAL_CPU_RATIO = 3.0
GOAL_BYTES_PER_WAITING = 2048


def main(exports: int = EXPORTS, waiting: int = WAITING) -> dict[str, Any]:
    with bench_stack() as stack:
        client = redis_of(stack)
        try:
            for n in range(WARMUP):
                stack.submit(f"warm-{n}@example.com")
            wait_until(lambda: counts(client).get("done", 0) >= WARMUP, timeout=60, what="warm-up")

            # Redis per waiting job: the ready callback never comes, so each job parks.
            stack.sandbox_put("/_sandbox/faults", {"default": {"drop_ready": True}})
            time.sleep(0.5)
            before = used_memory(client)
            for n in range(waiting):
                stack.submit(f"wait-{n}@example.com")
            wait_until(
                lambda: (
                    counts(client).get("verified", 0) >= waiting
                    and client.llen("apsis") == 0
                    and client.xlen("apsis:inbox") == 0
                ),
                timeout=120,
                what="jobs parked waiting",
            )
            bytes_per_waiting = (used_memory(client) - before) / waiting
            requests.delete(f"{stack.apsis_url}/_sandbox/faults", timeout=5).raise_for_status()

            # CPU per export, over every process of the pool (and Redis's, shown apart).
            groups = stack_groups(stack)
            redis_pid = redis_server_pid(stack)
            done_before = counts(client).get("done", 0)
            cpu_before = group_cpu_seconds(groups)
            redis_before = pid_cpu_seconds(redis_pid) if redis_pid else 0.0
            started = time.monotonic()
            for n in range(exports):
                stack.submit(f"cost-{n}@example.com")
            wait_until(
                lambda: counts(client).get("done", 0) >= done_before + exports,
                timeout=240,
                what="exports done",
                every=0.25,
            )
            wall = time.monotonic() - started
            time.sleep(0.5)  # the last chains' acks and log lines
            pool_cpu = group_cpu_seconds(groups) - cpu_before
            redis_cpu = (pid_cpu_seconds(redis_pid) if redis_pid else 0.0) - redis_before
            floor = run_floor(stack.apsis_url, exports)
        finally:
            client.close()

    pool_ms = 1000 * pool_cpu / exports
    floor_ms = 1000 * floor["cpu_seconds"] / exports
    deliverable_ms = 1000 * floor["deliverable_cpu_seconds"] / exports
    ratio = pool_ms / floor_ms
    rows = [
        {
            "side": "pool (webhook + workers)",
            "exports": exports,
            "wall_s": round(wall, 1),
            "cpu_ms_per_export": round(pool_ms, 2),
            "redis_cpu_ms_per_export": round(1000 * redis_cpu / exports, 2),
        },
        {
            "side": "floor (one process, no queue)",
            "exports": exports,
            "wall_s": round(floor["wall_seconds"], 1),
            "cpu_ms_per_export": round(floor_ms, 2),
            "redis_cpu_ms_per_export": 0.0,
        },
        {
            "side": "  of which the deliverable",
            "exports": exports,
            "wall_s": "",
            "cpu_ms_per_export": round(deliverable_ms, 2),
            "redis_cpu_ms_per_export": "",
        },
    ]
    cpu_ok = ratio <= GOAL_CPU_RATIO
    mem_ok = bytes_per_waiting < GOAL_BYTES_PER_WAITING
    summary = (
        f"cost_per_export: {pool_ms:.1f} CPU ms per export vs floor {floor_ms:.1f} ms = "
        f"{ratio:.2f}x (goal <= {GOAL_CPU_RATIO:g}x: {'met' if cpu_ok else 'MISSED'}; "
        f"the deliverable itself {deliverable_ms:.1f} ms); "
        f"Redis {bytes_per_waiting:,.0f} B per waiting job over {waiting} "
        f"(goal < {GOAL_BYTES_PER_WAITING} B: {'met' if mem_ok else 'MISSED'})"
    )
    return emit(
        "cost_per_export",
        rows,
        summary,
        cpu_ratio=round(ratio, 2),
        deliverable_ms=round(deliverable_ms, 2),
        bytes_per_waiting_job=round(bytes_per_waiting),
        goal_met=cpu_ok and mem_ok,
    )


def run_floor(apsis_url: str, exports: int) -> dict[str, float]:
    """The floor in its own process, so its CPU time is its own."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.cost_per_export", "--floor", apsis_url, str(exports)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    figures: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return figures


# -- the floor --------------------------------------------------------------------------------


class _Callbacks(BaseHTTPRequestHandler):
    """Receives APSIS's callbacks on /cb/<n>; keeps the download URL of each ready one."""

    protocol_version = "HTTP/1.1"
    ready: ClassVar[dict[str, str]] = {}
    arrived: ClassVar[threading.Condition] = threading.Condition()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()
        if body.get("code") == 200:
            with self.arrived:
                self.ready[self.path] = body["message"]
                self.arrived.notify_all()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def deliver(
    storage: Any, job_id: str, export_key: str, *, source: Path, source_sha256: str, tmp: Path
) -> None:
    """What the product's fetch step makes of a downloaded file, by the same code (as
    ``worker.flow.pipeline._fetch_and_store`` with no link asked for): split, profiles,
    report, package, manifest last."""
    from worker.deliverable import manifest, report
    from worker.deliverable.export_file import split_export
    from worker.deliverable.package import store_package
    from worker.model.jobs import ExportOptions, Job, State

    now = time.time()
    job = Job(
        job_id=job_id,
        state=State.READY,
        export_key=export_key,
        account="sandbox",
        options=ExportOptions(),
        attempt=1,
        created_at=now,
        updated_at=now,
        deadline=now + 3600,
    )
    split = split_export(source, tmp / "split", requested_key=export_key)
    storage.put_file(manifest.export_object(job_id), source)
    for profile in split.profiles:
        storage.put_file(manifest.profile_object(job_id, profile.index), profile.path)
    reports = report.store_report(storage, job, split, tmp / "report")
    package = store_package(
        storage, job, split, tmp, warnings=manifest.manifest_warnings(job, split)
    )
    history = [{"state": "done", "at": round(now, 3), "note": "stored"}]
    body = manifest.encode(
        manifest.build_manifest(
            job,
            history=history,
            source_sha256=source_sha256,
            source_bytes=source.stat().st_size,
            split=split,
            finished_at=now,
            reports=reports,
            links={},
            package=package,
        )
    )
    storage.put_bytes(manifest.manifest_object(job_id), body)


def floor(apsis_url: str, exports: int) -> dict[str, float]:
    from worker.deliverable.storage import Storage

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Callbacks)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    callback_base = f"http://127.0.0.1:{server.server_port}/cb"
    out_dir = Path(tempfile.mkdtemp(prefix="apsis-floor-"))
    store_dir = tempfile.TemporaryDirectory(prefix="apsis-floor-store-")
    storage = Storage(f"file://{store_dir.name}")
    session = requests.Session()
    deliverable_cpu = 0.0
    cpu_start, wall_start = time.process_time(), time.monotonic()
    token = session.post(
        f"{apsis_url}/oauth/token",
        json={
            "grant_type": "client_credentials",
            "client_id": "sandbox",
            "client_secret": "sandbox",
        },
        timeout=10,
    ).json()["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    for n in range(exports):
        key = f"floor-{n}@example.com"
        path = f"/cb/{n}"
        answer = session.post(
            f"{apsis_url}/audience/profiles/export-single/{quote(key, safe='')}",
            json={"callback_url": f"{callback_base}/{n}", "include_merged_profiles": True},
            headers=auth,
            timeout=10,
        )
        answer.raise_for_status()

        def arrived(wanted: str = path) -> bool:
            return wanted in _Callbacks.ready

        with _Callbacks.arrived:
            if not _Callbacks.arrived.wait_for(arrived, timeout=30):
                raise RuntimeError("no ready callback within 30 s")
            url = _Callbacks.ready.pop(path)
        source = out_dir / f"{n}.json"
        with session.get(url, headers=auth, stream=True, timeout=30) as download:
            download.raise_for_status()
            digest = hashlib.sha256()  # hashed on the way in, as the product does
            with source.open("wb") as out:
                for chunk in download.iter_content(64 * 1024):
                    digest.update(chunk)
                    out.write(chunk)
        started = time.process_time()
        with tempfile.TemporaryDirectory(prefix="apsis-floor-job-") as tmp:
            deliver(
                storage,
                f"floor{n:06d}",
                key,
                source=source,
                source_sha256=digest.hexdigest(),
                tmp=Path(tmp),
            )
        deliverable_cpu += time.process_time() - started
        source.unlink()
    figures = {
        "cpu_seconds": time.process_time() - cpu_start,
        "wall_seconds": time.monotonic() - wall_start,
        "deliverable_cpu_seconds": deliverable_cpu,
    }
    server.shutdown()
    out_dir.rmdir()
    store_dir.cleanup()
    return figures


if __name__ == "__main__":
    if sys.argv[1:2] == ["--floor"]:
        print(json.dumps(floor(sys.argv[2], int(sys.argv[3]))))
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else EXPORTS)
