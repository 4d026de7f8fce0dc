"""``apsis-export demo``: a real export end to end on embedded defaults, then a summary."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import time

from worker.cli.stack import LocalStack
from worker.config import load_settings
from worker.flow.runtime import Runtime, build_runtime
from worker.model.jobs import FINAL, State

#: The demo's data subjects: (export key, merged profiles the sandbox adds, options).
SUBJECTS: list[tuple[str, int, dict[str, bool]]] = [
    ("ada.lovelace@example.com", 2, {"include_attribute_history": True}),
    ("alan.turing@example.com", 0, {}),
    ("grace.hopper@example.com", 1, {"include_type_definitions": True}),
    ("zoë.ångström@example.com", 0, {"include_attribute_history": True}),
    ("edsger.dijkstra@example.com", 3, {"include_type_definitions": True}),
]
#: Seconds the demo waits for every export to finish.
DEMO_TIMEOUT = 120.0


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def run(*, keep: bool = False) -> int:
    """Start Redis, the sandbox, the webhook and a worker; export; summarise; stop all."""
    # A SIGTERM (e.g. from `timeout`) unwinds through the finally below, so nothing is left.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stack = LocalStack(storage_url=os.environ.get("STORAGE_URL", "file://./exports"))
    try:
        stack.start()
        _say(f"redis     {stack.redis_url}  ({stack.redis_kind})")
        _say(f"sandbox   APSIS One simulator at {stack.apsis_url}")
        _say(f"webhook   {stack.webhook_url}  (gunicorn)")
        _say(f"worker    celery, concurrency 2  (logs in {stack.log_dir})")
        faults = {"keys": {key: {"merged_count": merged} for key, merged, _ in SUBJECTS}}
        stack.sandbox_put("/_sandbox/faults", faults)
        os.environ.update(stack.env)  # this process reads the jobs with the same settings
        settings = load_settings()
        rt = build_runtime(settings)
        job_ids = [
            stack.submit(key, reference=f"DEMO-{number:03d}", **options)
            for number, (key, _merged, options) in enumerate(SUBJECTS, start=1)
        ]
        _say(f"exports   {len(job_ids)} submitted; APSIS allows 1 export request a second\n")
        _progress(rt, job_ids)
        ok = _summary(rt, job_ids)
        _say(f"\nresults   {settings.STORAGE_URL}/jobs/<job id>/")
        _say("          manifest.json (written last), report.html (open it in a browser),")
        _say("          report.json, export.json (as APSIS served it), profiles/<n>.json,")
        if settings.PACKAGE_ENABLED:
            _say("          package.zip (what a DPO hands over: index.html, JSON, CSV, checksums)")
        return 0 if ok else 1
    finally:
        stack.stop()
        if not keep:
            shutil.rmtree(stack.log_dir, ignore_errors=True)


def _progress(rt: Runtime, job_ids: list[str]) -> None:
    deadline = time.monotonic() + DEMO_TIMEOUT
    last = ""
    final = {state.value for state in FINAL}
    while True:
        states = []
        for job_id in job_ids:
            job = rt.jobs.find(job_id)
            states.append(job.state.value if job else "submitted")
        counts = {s: states.count(s) for s in dict.fromkeys(states)}
        line = "  ".join(f"{state} {n}" for state, n in sorted(counts.items()))
        if line != last:
            _say(f"  {time.strftime('%H:%M:%S')}  {line}")
            last = line
        if all(s in final for s in states):
            return
        if time.monotonic() > deadline:
            _say(f"  timed out after {DEMO_TIMEOUT:.0f} s")
            return
        time.sleep(0.25)


def _summary(rt: Runtime, job_ids: list[str]) -> bool:
    _say("")
    header = (
        f"{'job':<32}  {'ref':<8}  {'state':<6}  {'profiles':>8}  {'bytes':>7}  sha256  manifest"
    )
    _say(header)
    _say("-" * len(header))
    all_ok = True
    for job_id in job_ids:
        job = rt.jobs.find(job_id)
        if job is None:
            _say(f"{job_id:<32}  {'':<8}  lost")
            all_ok = False
            continue
        verified = job.state == State.DONE and _verify(rt, job_id)
        all_ok &= verified
        _say(
            f"{job_id:<32}  {job.reference or '':<8}  {job.state.value:<6}  "
            f"{job.profiles or 0:>8}  "
            f"{job.source_bytes or 0:>7}  {'ok' if verified else '-':<6}  "
            f"{job.manifest or job.error or ''}"
        )
    return all_ok


def _verify(rt: Runtime, job_id: str) -> bool:
    """Every object the manifest lists is stored with the digest the manifest gives."""
    data = json.loads(rt.storage.get_bytes(f"jobs/{job_id}/manifest.json"))
    for entry in [data["source"], *data["profiles"]]:
        digest = hashlib.sha256(rt.storage.get_bytes(entry["object"])).hexdigest()
        if digest != entry["sha256"]:
            return False
    return True
