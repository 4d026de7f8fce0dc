"""worker/ops/verify.py: every object re-read and hashed; tampered, missing and extra objects."""

from __future__ import annotations

import json

import pytest
from job_support import make_runtime, run_job

from worker.cli.commands import main
from worker.ops import verify


def test_a_fresh_job_verifies_clean_and_lists_every_object() -> None:
    rt = make_runtime()
    run_job(rt, "j1")
    body = json.loads(rt.storage.get_bytes("jobs/j1/manifest.json"))
    assert set(body["reports"]) == {"html", "json"}
    result = verify.verify(rt, "j1")
    assert result.ok, result.problems
    # source + 1 profile + 2 reports + the manifest
    assert result.objects == 5


def test_a_tampered_object_and_a_missing_one_are_each_one_line() -> None:
    rt = make_runtime()
    run_job(rt, "j1")
    profile = rt.storage.get_bytes("jobs/j1/profiles/0.json")
    rt.storage.put_bytes("jobs/j1/profiles/0.json", profile.replace(b"zoe", b"eve"))
    rt.storage.delete("jobs/j1/report.html")
    rt.storage.put_bytes("jobs/j1/extra.json", b"{}")
    problems = verify.verify(rt, "j1").problems
    assert len(problems) == 3
    assert any(p.startswith("jobs/j1/profiles/0.json: sha256 mismatch") for p in problems)
    assert "jobs/j1/report.html: missing" in problems
    assert "jobs/j1/extra.json: stored but not listed in the manifest" in problems


def test_a_manifest_not_matching_the_job_record_is_caught() -> None:
    rt = make_runtime()
    run_job(rt, "j1")
    body = json.loads(rt.storage.get_bytes("jobs/j1/manifest.json"))
    body["reference"] = "forged"
    rt.storage.put_bytes("jobs/j1/manifest.json", json.dumps(body).encode())
    (problem,) = verify.verify(rt, "j1").problems
    assert problem.startswith("jobs/j1/manifest.json: sha256 mismatch (job record")


def test_the_cli_exits_1_on_a_problem_and_0_when_clean(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rt = make_runtime()
    run_job(rt, "j1")
    monkeypatch.setattr("worker.cli.commands.build_runtime", lambda settings: rt)
    assert main(["verify", "j1"]) == 0
    assert "j1: OK" in capsys.readouterr().out
    rt.storage.put_bytes("jobs/j1/export.json", b"{}")
    assert main(["verify", "j1"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("jobs/j1/export.json: sha256 mismatch")
    assert main(["verify", "nope"]) != 0
    assert "no job or batch nope" in capsys.readouterr().err
