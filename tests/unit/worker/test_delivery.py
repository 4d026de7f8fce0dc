"""worker/flow/delivery.py and ``apsis-export link``: expiries, refusals, delivery copies."""

from __future__ import annotations

import json
import secrets

import pytest
from job_support import make_runtime, patch_cli_runtime, run_cli, run_job

from worker.errors import InputError
from worker.flow import delivery, retention


@pytest.mark.parametrize(
    ("text", "seconds"), [("7d", 604_800), ("12h", 43_200), ("30m", 1800), ("3600", 3600)]
)
def test_expiries_read_as_people_write_them(text: str, seconds: int) -> None:
    assert delivery.parse_expiry(text, longest=7 * 86_400) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("8d", "at most 7d (LINK_MAX_EXPIRY); asked for 8d"),
        ("10s", "at least a minute"),
        ("soon", "not a duration"),
    ],
)
def test_a_bad_expiry_is_refused_in_one_line(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        delivery.parse_expiry(text, longest=7 * 86_400)


def test_the_result_names_the_package_and_carries_no_link_unasked() -> None:
    rt = make_runtime()
    run_job(rt, "j1")
    from worker.flow import pipeline

    result = pipeline.fetch_and_store(rt, "j1", lambda name, args: None)
    assert result is not None
    body = result.to_json()
    assert body["package"] == "jobs/j1/package.zip"
    assert "package_link" not in body
    manifest = json.loads(rt.storage.get_bytes("jobs/j1/manifest.json"))
    assert manifest["package"]["object"] == "jobs/j1/package.zip"


def test_packaging_can_be_turned_off() -> None:
    rt = make_runtime(PACKAGE_ENABLED=False)
    run_job(rt, "j1")
    assert not rt.storage.exists("jobs/j1/package.zip")
    assert "package" not in json.loads(rt.storage.get_bytes("jobs/j1/manifest.json"))


def test_link_on_a_store_that_cannot_sign_says_what_to_do_instead(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rt = patch_cli_runtime(monkeypatch, STORAGE_URL="memory:///")
    run_job(rt, "j1")
    code, out, err = run_cli(capsys, "link", "j1", "--expires", "1d")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "memory:// store cannot sign links" in err and "hand it over another way" in err


def test_link_refuses_unknown_jobs_and_long_expiries(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LINK_MAX_EXPIRY", "3600")
    patch_cli_runtime(monkeypatch, STORAGE_URL="memory:///")
    code, _, err = run_cli(capsys, "link", "nosuchjob")
    assert code == 3 and err.count("\n") == 1
    code, _, err = run_cli(capsys, "link", "nosuchjob", "--expires", "2h")
    assert code == 2 and "at most 1h" in err


def test_export_with_a_link_on_a_store_that_cannot_sign_is_refused_before_queueing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CALLBACK_SECRET", secrets.token_urlsafe(32))
    rt = patch_cli_runtime(monkeypatch, STORAGE_URL="memory:///")
    code, _, err = run_cli(capsys, "export", "zoe@example.com", "--link", "7d", "--wait")
    assert code == 2 and "cannot sign links" in err
    assert rt.redis.keys("apsis:job:*") == []
    code, _, err = run_cli(capsys, "export", "zoe@example.com", "--link", "7d")
    assert code == 2 and "--wait" in err


def test_expired_delivery_copies_are_swept_even_with_retention_off() -> None:
    rt = make_runtime(RETENTION_DAYS=0)
    rt.storage.put_bytes("deliveries/j1/abc/package.zip", b"zip")
    rt.storage.put_bytes("deliveries/j1/def/package.zip", b"zip")
    rt.redis.zadd(delivery.DELIVERIES_KEY, {"deliveries/j1/abc/package.zip": 100.0})
    rt.redis.zadd(delivery.DELIVERIES_KEY, {"deliveries/j1/def/package.zip": 10_000.0})
    assert retention.due(rt, now=200.0)
    retention.sweep(rt, now=200.0)
    assert rt.storage.list("deliveries") == ["deliveries/j1/def/package.zip"]
    assert not retention.due(rt, now=200.0)


def test_retention_deletes_the_package_and_its_delivery_copies_with_the_job() -> None:
    rt = make_runtime(RETENTION_DAYS=1)
    run_job(rt, "j1", now=1000.0)
    rt.jobs.mark_chain_dispatched("j1")
    rt.storage.put_bytes("deliveries/j1/abc/package.zip", b"zip")
    rt.redis.zadd(delivery.DELIVERIES_KEY, {"deliveries/j1/abc/package.zip": 1e12})
    assert retention.delete_job(rt, "j1", now=2e9, reason="test")
    assert rt.storage.list("jobs/j1") == [] and rt.storage.list("deliveries") == []
    record = json.loads(rt.storage.get_bytes("deletions/j1.json"))
    assert "jobs/j1/package.zip" in record["deleted"]["objects"]
    assert "deliveries/j1/abc/package.zip" in record["deleted"]["objects"]
    assert rt.redis.zcard(delivery.DELIVERIES_KEY) == 0
