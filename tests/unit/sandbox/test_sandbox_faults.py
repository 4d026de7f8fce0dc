"""Tests for sandbox/faults.py through the API: every fault kind the exporter must survive."""

from __future__ import annotations

import hashlib
import json

import pytest
import requests
from conftest import BASE, CallbackSink, export_and_wait, fetch_token, request_export

from sandbox.faults import FaultConfig, FaultConfigError, Faults, FaultSpec
from sandbox.state import SandboxState

FAULTS = f"{BASE}/_sandbox/faults"


def put(session: requests.Session, faults: dict[str, object]) -> None:
    response = session.put(FAULTS, json=faults)
    assert response.status_code == 200, response.text


def test_put_rejects_unknown_fields(session: requests.Session) -> None:
    assert session.put(FAULTS, json={"default": {"nonsense": 1}}).status_code == 400
    assert session.put(FAULTS, json={"default": {"duplicate": "two"}}).status_code == 400
    assert session.put(FAULTS, json={"default": {"auth_style": "418"}}).status_code == 400


def test_key_spec_overrides_default_field_by_field() -> None:
    faults = Faults()
    faults.set(
        FaultConfig.from_json(
            {"default": {"drop_verify": True, "duplicate": 1}, "keys": {"K": {"duplicate": 3}}}
        )
    )
    assert faults.effective("K").duplicate == 3
    assert faults.effective("K").drop_verify is True
    assert faults.effective("other").duplicate == 1
    with pytest.raises(FaultConfigError):
        FaultSpec.from_json({"verify_delay": -1})


def test_delays_override_config(
    session: requests.Session, headers: dict[str, str], sink: CallbackSink, state: SandboxState
) -> None:
    put(session, {"keys": {"ABC-123": {"verify_delay": 30, "ready_delay": 30}}})
    assert request_export(session, headers).status_code == 202
    assert state.scheduler.pending() == 2
    assert sink.received == []


def test_drop_verify_and_drop_ready(
    session: requests.Session, headers: dict[str, str], sink: CallbackSink, state: SandboxState
) -> None:
    put(session, {"keys": {"A": {"drop_verify": True}, "B": {"drop_ready": True}}})
    request_export(session, headers, "A")
    request_export(session, headers, "B")
    assert state.scheduler.wait_idle()
    by_key: dict[str, list[int]] = {}
    for entry in state.journal.entries(kind="callback"):
        by_key.setdefault(entry["export_key"], []).append(entry["code"])
    assert by_key == {"A": [200], "B": [100]}


def test_duplicate_sends_extra_copies(
    session: requests.Session, headers: dict[str, str], sink: CallbackSink, state: SandboxState
) -> None:
    put(session, {"default": {"duplicate": 2}})
    request_export(session, headers)
    assert state.scheduler.wait_idle()
    assert sorted(sink.codes()) == [100, 100, 100, 200, 200, 200]
    assert len({body["message"] for _, body in sink.received if body["code"] == 200}) == 1


def test_reorder_sends_ready_before_verify(
    session: requests.Session, headers: dict[str, str], sink: CallbackSink
) -> None:
    put(session, {"default": {"reorder": True}})
    request_export(session, headers)
    sink.wait(2)
    assert sink.codes() == [200, 100]


def test_failure_code_replaces_ready(
    session: requests.Session, headers: dict[str, str], sink: CallbackSink, state: SandboxState
) -> None:
    put(session, {"default": {"failure_code": 500}})
    request_export(session, headers)
    bodies = sink.wait(2)
    assert bodies[1]["code"] == 500
    assert bodies[1]["message"].startswith("Export failed: ")
    assert state.definitions()[0].ready_at is None


@pytest.mark.parametrize(
    ("entry", "status", "retry_after"),
    [
        (429, 429, "1"),
        ({"status": 429, "retry_after": 7}, 429, "7"),
        ({"status": 429, "retry_after": None}, 429, None),
        (503, 503, "1"),
        (500, 500, None),
    ],
)
def test_export_errors_are_consumed_in_order(
    session: requests.Session,
    headers: dict[str, str],
    entry: object,
    status: int,
    retry_after: str | None,
) -> None:
    put(session, {"keys": {"ABC-123": {"export_errors": [entry]}}})
    first = request_export(session, headers)
    assert first.status_code == status
    assert first.headers.get("Retry-After") == retry_after
    assert first.json()["status"] == status
    assert request_export(session, headers).status_code == 202
    assert request_export(session, headers, "other-key").status_code == 202


def test_omit_retry_after_strips_the_header(
    session: requests.Session, headers: dict[str, str]
) -> None:
    put(session, {"default": {"export_errors": [429], "omit_retry_after": True}})
    response = request_export(session, headers)
    assert response.status_code == 429
    assert "Retry-After" not in response.headers


def test_download_errors_then_the_file(
    session: requests.Session, headers: dict[str, str], sink: CallbackSink
) -> None:
    url = export_and_wait(session, headers, sink)
    put(session, {"default": {"download_errors": [202, 404, 410, 503]}})
    statuses = [session.get(url, headers=headers).status_code for _ in range(5)]
    assert statuses == [202, 404, 410, 503, 200]


def test_token_errors_then_a_token(session: requests.Session) -> None:
    put(session, {"default": {"token_errors": [503, 429]}})
    body = {"grant_type": "client_credentials", "client_id": "sandbox", "client_secret": "sandbox"}
    statuses = [session.post(f"{BASE}/oauth/token", json=body).status_code for _ in range(3)]
    assert statuses == [503, 429, 200]


def test_token_redirect_to_answers_307_until_cleared(session: requests.Session) -> None:
    put(session, {"default": {"token_redirect_to": "http://127.0.0.2:9/oauth/token"}})
    body = {"grant_type": "client_credentials", "client_id": "sandbox", "client_secret": "sandbox"}
    response = session.post(f"{BASE}/oauth/token", json=body, allow_redirects=False)
    assert response.status_code == 307
    assert response.headers["Location"] == "http://127.0.0.2:9/oauth/token"
    put(session, {})
    assert session.post(f"{BASE}/oauth/token", json=body).status_code == 200


def test_expire_tokens_until_a_new_token_is_fetched(
    session: requests.Session, headers: dict[str, str]
) -> None:
    put(session, {"default": {"expire_tokens": True}})
    refused = request_export(session, headers)
    assert refused.status_code == 401
    assert "expired" in refused.json()["detail"]
    fresh = {"Authorization": f"Bearer {fetch_token(session)}"}
    assert request_export(session, fresh).status_code == 202


def test_auth_style_403_answers_the_gateway_deny(
    session: requests.Session, headers: dict[str, str]
) -> None:
    put(session, {"default": {"expire_tokens": True, "auth_style": "403"}})
    response = request_export(session, headers)
    assert response.status_code == 403
    assert response.json() == {
        "message": "User is not authorized to access this resource with an explicit deny"
    }


def test_truncate_at_cuts_the_stream_then_recovers(
    session: requests.Session, headers: dict[str, str], sink: CallbackSink, state: SandboxState
) -> None:
    url = export_and_wait(session, headers, sink)
    put(session, {"default": {"truncate_at": 1000, "fault_times": 1}})
    truncated = session.get(url, headers=headers)
    assert truncated.status_code == 200
    assert len(truncated.content) == 1000
    with pytest.raises(ValueError):
        json.loads(truncated.content)
    whole = session.get(url, headers=headers).content
    assert whole[:1000] == truncated.content
    json.loads(whole)
    sent = [e["bytes"] for e in state.journal.entries(kind="download")]
    assert sent == [1000, 4096]


def test_corrupt_keeps_length_but_breaks_json(
    session: requests.Session, headers: dict[str, str], sink: CallbackSink, state: SandboxState
) -> None:
    state.patch_config({"file_size": 200_000})
    url = export_and_wait(session, headers, sink)
    good = session.get(url, headers=headers).content
    put(session, {"default": {"corrupt": True}})
    bad = session.get(url, headers=headers).content
    assert len(bad) == len(good)
    assert bad != good
    with pytest.raises(ValueError):
        json.loads(bad)
    assert session.get(url, headers=headers).content == bad  # no fault_times: always
    journaled = state.journal.entries(kind="download")[-1]
    assert journaled["sha256"] == hashlib.sha256(bad).hexdigest()


def test_download_host_changes_the_ready_url(
    session: requests.Session, headers: dict[str, str], sink: CallbackSink
) -> None:
    put(session, {"default": {"download_host": "http://127.0.0.2:9999"}})
    url = export_and_wait(session, headers, sink)
    assert url.startswith("http://127.0.0.2:9999/audience/profiles/export-single/accounts/")


def test_redirect_to_answers_302(
    session: requests.Session, headers: dict[str, str], sink: CallbackSink
) -> None:
    url = export_and_wait(session, headers, sink)
    put(session, {"default": {"redirect_to": "https://evil.test/steal"}})
    response = session.get(url, headers=headers, allow_redirects=False)
    assert response.status_code == 302
    assert response.headers["Location"] == "https://evil.test/steal"


def test_file_size_and_merged_count_per_key(
    session: requests.Session, headers: dict[str, str], sink: CallbackSink
) -> None:
    put(session, {"keys": {"ABC-123": {"file_size": 50_000, "merged_count": 4}}})
    url = export_and_wait(session, headers, sink, include_merged_profiles=True)
    content = session.get(url, headers=headers).content
    assert len(content) == 50_000
    assert len(json.loads(content)["profiles"]) == 5


def test_delete_faults_restores_normal_service(
    session: requests.Session, headers: dict[str, str]
) -> None:
    put(session, {"default": {"export_errors": [500, 500]}})
    assert session.delete(FAULTS).status_code == 204
    assert request_export(session, headers).status_code == 202


def test_faults_settable_in_process(
    session: requests.Session, headers: dict[str, str], state: SandboxState
) -> None:
    state.set_faults(FaultConfig(default=FaultSpec.from_json({"export_errors": [410]})))
    assert request_export(session, headers).status_code == 410
