"""A real job's report.html rendered in headless Chromium: the person's values are visible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from e2e_support import (
    OUTPUT,
    StackFactory,
    find_chromium,
    run_chromium,
    screenshot,
    wait_final,
)

from worker.deliverable.storage import Storage
from worker.model.jobs import JobStore, State

pytestmark = pytest.mark.integration


def test_report_renders_in_chromium_with_the_persons_values(
    make_stack: StackFactory, redis_db: redis.Redis, tmp_path: Path
) -> None:
    chromium = find_chromium()
    stack = make_stack()
    key = "zoe.report@example.com"
    stack.sandbox_put("/_sandbox/faults", {"keys": {key: {"merged_count": 2}}})
    job_id = stack.submit(
        key,
        include_attribute_history=True,
        include_type_definitions=True,
        include_merged_profiles=True,
    )
    (job,) = wait_final(JobStore(redis_db), [job_id])
    assert job.state == State.DONE, job.error

    storage = Storage(stack.env["STORAGE_URL"])
    manifest = json.loads(storage.get_bytes(f"jobs/{job_id}/manifest.json"))
    assert manifest["reports"]["html"]["object"] == f"jobs/{job_id}/report.html"
    requested = json.loads(storage.get_bytes(manifest["profiles"][0]["object"]))
    section = next(iter(requested["sections"].values()))
    values = [a["value"] for a in section["attributes"].values()]
    names = [a["name"] for a in section["attributes"].values()]
    page = tmp_path / "report.html"
    page.write_bytes(storage.get_bytes(f"jobs/{job_id}/report.html"))

    dom = run_chromium(chromium, tmp_path / "profile-dom", "--dump-dom", page.as_uri())
    for text in [key, f"{key}~merged-1", f"{key}~merged-2", *values, *names]:
        assert text in dom, f"{text!r} not rendered"
    assert "Change history" in dom and "Events" in dom

    OUTPUT.mkdir(exist_ok=True)
    shot = OUTPUT / "report.png"
    screenshot(chromium, page, shot, window="1280,2000", profile_dir=tmp_path / "profile-shot")
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
