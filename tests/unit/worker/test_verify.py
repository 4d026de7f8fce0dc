"""worker/ops/verify.py: every object re-read and hashed; tampered, missing and extra objects."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from job_support import make_runtime, run_job

from worker.cli.commands import main
from worker.flow.runtime import Runtime
from worker.ops import verify


def test_a_fresh_job_verifies_clean_and_lists_every_object() -> None:
    rt = make_runtime()
    run_job(rt, "j1")
    body = json.loads(rt.storage.get_bytes("jobs/j1/manifest.json"))
    assert set(body["reports"]) == {"html", "json"}
    result = verify.verify(rt, "j1")
    assert result.ok, result.problems
    # source + 1 profile + 2 reports + the package + the manifest
    assert result.objects == 6


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


def _rezip(rt: Runtime, key: str, change: Callable[[str, bytes], bytes | None]) -> bytes:
    """The package at ``key`` rewritten member by member, ``change(name, data)`` applied."""
    import io
    import zipfile

    source = zipfile.ZipFile(io.BytesIO(rt.storage.get_bytes(key)))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for info in source.infolist():
            data = change(info.filename, source.read(info.filename))
            if data is not None:
                zf.writestr(info.filename, data)
    return out.getvalue()


def _forge_manifest(rt: Runtime, job_id: str, package: bytes) -> None:
    """Store ``package`` and a manifest (and job digest) vouching for it: only what is
    inside the zip can then be wrong."""
    import hashlib

    rt.storage.put_bytes(f"jobs/{job_id}/package.zip", package)
    body = json.loads(rt.storage.get_bytes(f"jobs/{job_id}/manifest.json"))
    body["package"].update(sha256=hashlib.sha256(package).hexdigest(), bytes=len(package))
    encoded = json.dumps(body).encode()
    rt.storage.put_bytes(f"jobs/{job_id}/manifest.json", encoded)
    rt.jobs.update(job_id, {"manifest_sha256": hashlib.sha256(encoded).hexdigest()})


def test_a_package_not_matching_the_manifest_is_caught() -> None:
    rt = make_runtime()
    run_job(rt, "j1")
    package = rt.storage.get_bytes("jobs/j1/package.zip")
    rt.storage.put_bytes("jobs/j1/package.zip", package + b"x")
    (problem,) = verify.verify(rt, "j1").problems
    assert problem.startswith("jobs/j1/package.zip: sha256 mismatch (manifest")


def test_a_file_inside_the_package_not_matching_its_checksum_is_caught() -> None:
    rt = make_runtime()
    run_job(rt, "j1")
    forged = _rezip(
        rt,
        "jobs/j1/package.zip",
        lambda name, data: data.replace(b"zoe", b"eve") if name == "profiles/0.json" else data,
    )
    _forge_manifest(rt, "j1", forged)
    assert verify.verify(rt, "j1").problems == [
        "jobs/j1/package.zip: profiles/0.json: sha256 does not match checksums.sha256"
    ]


def test_a_package_missing_a_file_or_not_a_zip_is_caught() -> None:
    rt = make_runtime()
    run_job(rt, "j1")
    dropped = _rezip(
        rt, "jobs/j1/package.zip", lambda name, data: None if name == "index.html" else data
    )
    _forge_manifest(rt, "j1", dropped)
    assert verify.verify(rt, "j1").problems == [
        "jobs/j1/package.zip: index.html: in checksums.sha256 but not inside"
    ]
    _forge_manifest(rt, "j1", b"PK not really a zip")
    assert verify.verify(rt, "j1").problems == [
        "jobs/j1/package.zip: not a readable zip (BadZipFile)"
    ]
