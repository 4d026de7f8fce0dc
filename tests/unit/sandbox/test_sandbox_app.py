"""Tests for sandbox/app.py and its endpoints: token, export, callbacks, download, errors."""

from __future__ import annotations

import base64
import hashlib
import json

import requests
from conftest import BASE, CALLBACK_URL, CallbackSink, export_and_wait, fetch_token, request_export
from flask import Flask
from sandbox_in_process import sandbox_app, sandbox_session

from sandbox.config import SandboxConfig
from sandbox.state import SandboxState

TOKEN_URL = f"{BASE}/oauth/token"


def test_token_is_issued_for_known_credentials(session: requests.Session) -> None:
    response = session.post(
        TOKEN_URL,
        json={
            "grant_type": "client_credentials",
            "client_id": "sandbox",
            "client_secret": "sandbox",
        },
    )
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 86400
    assert body["access_token"].count(".") == 2


def test_token_refused_on_bad_secret_or_body(session: requests.Session) -> None:
    good = {"grant_type": "client_credentials", "client_id": "sandbox", "client_secret": "sandbox"}
    assert session.post(TOKEN_URL, json={**good, "client_secret": "nope"}).status_code == 401
    assert session.post(TOKEN_URL, json={**good, "client_id": "nope"}).status_code == 401
    bad_grant = session.post(TOKEN_URL, json={**good, "grant_type": "password"})
    assert bad_grant.status_code == 400
    assert bad_grant.json()["status"] == 400
    assert session.post(TOKEN_URL, data=b"{not json").status_code == 400


def test_configured_accounts_get_their_own_tokens(sink: CallbackSink) -> None:
    config = SandboxConfig(accounts=[("id-a", "secret-a", "acme")])
    with sandbox_app(config, sink) as app, sandbox_session(app, BASE) as session:
        token = fetch_token(session, "id-a", "secret-a")
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "==").decode())
    assert claims["account"] == "acme"
    assert {"sub", "iat", "exp", "jti"} <= set(claims)


def test_export_without_or_with_bad_token_is_401(session: requests.Session) -> None:
    assert request_export(session, {}).status_code == 401
    response = request_export(session, {"Authorization": "Bearer abc.def.ghi"})
    assert response.status_code == 401
    assert response.json()["title"] == "Unauthorized"


def test_token_lifetime_is_honoured_through_exp(
    session: requests.Session, state: SandboxState
) -> None:
    state.patch_config({"token_lifetime": 60})
    headers = {"Authorization": f"Bearer {fetch_token(session)}"}
    assert request_export(session, headers).status_code == 202
    now = state.clock()
    state.clock = lambda: now + 61
    assert request_export(session, headers).status_code == 401


def test_export_then_verify_then_ready_callback(
    session: requests.Session, headers: dict[str, str], sink: CallbackSink
) -> None:
    response = request_export(session, headers, include_type_definitions=True)
    assert response.status_code == 202
    assert response.content == b""
    bodies = sink.wait(2)
    assert [b["code"] for b in bodies] == [100, 200]
    assert bodies[0]["message"] == "Callback verified"
    assert bodies[1]["message"].startswith(
        f"{BASE}/audience/profiles/export-single/accounts/sandbox/definitions/"
    )
    assert bodies[1]["message"].endswith("?metadata=true")
    assert {url for url, _ in sink.received} == {CALLBACK_URL}


def test_export_body_is_validated(session: requests.Session, headers: dict[str, str]) -> None:
    url = f"{BASE}/audience/profiles/export-single/ABC"
    assert session.post(url, json={}, headers=headers).status_code == 400
    assert session.post(url, json={"callback_url": "ftp://x/y"}, headers=headers).status_code == 400
    wrong_type = {"callback_url": CALLBACK_URL, "include_merged_profiles": "yes"}
    assert session.post(url, json=wrong_type, headers=headers).status_code == 400
    assert session.post(url, data=b"[1,", headers=headers).status_code == 400


def test_unknown_key_is_404(session: requests.Session, headers: dict[str, str]) -> None:
    response = request_export(session, headers, "unknown-person")
    assert response.status_code == 404
    assert response.json()["status"] == 404


def test_configured_unknown_key_is_404(session: requests.Session, state: SandboxState) -> None:
    state.patch_config({"unknown_keys": frozenset({"gone"})})
    headers = {"Authorization": f"Bearer {fetch_token(session)}"}
    assert request_export(session, headers, "gone").status_code == 404


def test_body_over_100_kb_is_413(session: requests.Session, headers: dict[str, str]) -> None:
    body = {"callback_url": CALLBACK_URL, "padding": "x" * 100_001}
    response = session.post(
        f"{BASE}/audience/profiles/export-single/ABC", json=body, headers=headers
    )
    assert response.status_code == 413


def test_download_streams_the_file_listed_in_exports(
    session: requests.Session, headers: dict[str, str], sink: CallbackSink, state: SandboxState
) -> None:
    state.patch_config({"file_size": 300_000})
    url = export_and_wait(session, headers, sink, include_merged_profiles=True)
    with session.get(url, headers=headers, stream=True) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "application/json"
        digest = hashlib.sha256()
        total = 0
        for chunk in response.iter_content(16_384):
            digest.update(chunk)
            total += len(chunk)
    listed = session.get(f"{BASE}/_sandbox/exports").json()
    assert len(listed) == 1
    assert listed[0]["sha256"] == digest.hexdigest()
    assert listed[0]["bytes"] == total == 300_000
    assert listed[0]["options"]["include_merged_profiles"] is True
    again = session.get(url, headers=headers)
    assert hashlib.sha256(again.content).hexdigest() == digest.hexdigest()
    document = again.json()
    assert list(document["profiles"]) == ["ABC-123", "ABC-123~merged-1", "ABC-123~merged-2"]


def test_download_needs_the_accounts_token(
    session: requests.Session, headers: dict[str, str], sink: CallbackSink
) -> None:
    url = export_and_wait(session, headers, sink)
    assert session.get(url).status_code == 401
    other_account = url.replace("/accounts/sandbox/", "/accounts/someone-else/")
    assert session.get(other_account, headers=headers).status_code == 403
    missing = url.rsplit("/", 1)[0] + "/00000000-0000-0000-0000-000000000000"
    assert session.get(missing, headers=headers).status_code == 404


def test_download_before_ready_is_202(
    session: requests.Session, headers: dict[str, str], state: SandboxState
) -> None:
    state.patch_config({"ready_delay": 30.0})
    assert request_export(session, headers).status_code == 202
    definition = state.definitions()[0]
    url = (
        f"{BASE}/audience/profiles/export-single/accounts/sandbox/definitions/"
        f"{definition.definition_id}"
    )
    assert session.get(url, headers=headers).status_code == 202


def test_unknown_endpoint_is_404_problem(
    session: requests.Session, headers: dict[str, str]
) -> None:
    response = session.get(f"{BASE}/audience/nothing", headers=headers)
    assert response.status_code == 404
    assert response.json()["status"] == 404
    assert session.get(f"{BASE}/audience/nothing").status_code == 401


def test_journal_records_every_api_request(
    session: requests.Session, headers: dict[str, str], sink: CallbackSink, state: SandboxState
) -> None:
    url = export_and_wait(session, headers, sink)
    session.get(url, headers=headers)
    state.journal.wait_for(lambda es: sum(e["kind"] == "download" for e in es) == 1)
    entries = session.get(f"{BASE}/_sandbox/journal").json()
    assert [e["kind"] for e in entries if e["kind"] != "callback"] == [
        "token",
        "export",
        "download",
    ]
    seqs = [e["seq"] for e in entries]
    assert seqs == sorted(seqs)
    token, export, download = (e for e in entries if e["kind"] != "callback")
    assert token["auth"] is False
    assert token["account"] == "sandbox"
    assert export["auth"] is True
    assert export["export_key"] == "ABC-123"
    assert export["status"] == 202
    assert download["bytes"] == 4096
    assert (
        download["sha256"] == hashlib.sha256(session.get(url, headers=headers).content).hexdigest()
    )
    assert download["path"] == url.split("?")[0].removeprefix(BASE)
    callbacks = [e for e in entries if e["kind"] == "callback"]
    assert [c["code"] for c in callbacks] == [100, 200]
    assert all(c["status"] == 204 and c["attempt"] == 1 for c in callbacks)
    assert callbacks[1]["definition_id"] == download["definition_id"]

    since = session.get(f"{BASE}/_sandbox/journal", params={"since": seqs[-1]}).json()
    assert [e["kind"] for e in since] == ["download"]
    assert session.delete(f"{BASE}/_sandbox/journal").status_code == 204
    assert session.get(f"{BASE}/_sandbox/journal").json() == []


def test_download_journaled_even_when_client_stops_reading(
    session: requests.Session, headers: dict[str, str], sink: CallbackSink, state: SandboxState
) -> None:
    state.patch_config({"file_size": 1_000_000})
    url = export_and_wait(session, headers, sink)
    response = session.get(url, headers=headers, stream=True)
    first = next(response.iter_content(1000))
    response.close()
    assert first
    download = state.journal.entries(kind="download")[0]
    assert 0 < download["bytes"] < 1_000_000


def test_patch_config_changes_delays_and_limits(
    session: requests.Session, state: SandboxState
) -> None:
    response = session.patch(
        f"{BASE}/_sandbox/config",
        json={"verify_delay": 0.5, "limits": {"download": [5, 10], "export": None}},
    )
    assert response.status_code == 200
    assert response.json()["verify_delay"] == 0.5
    assert state.limiter.limits()["download"] == (5, 10.0)
    assert session.patch(f"{BASE}/_sandbox/config", json={"bogus": 1}).status_code == 400
    assert session.patch(f"{BASE}/_sandbox/config", json={"limits": {"x": None}}).status_code == 400


def test_reset_forgets_exports_faults_and_journal(
    app: Flask, session: requests.Session, headers: dict[str, str], state: SandboxState
) -> None:
    state.set_faults({"default": {"drop_ready": True}})
    request_export(session, headers)
    assert session.post(f"{BASE}/_sandbox/reset").status_code == 204
    assert state.definitions() == []
    assert state.journal.entries() == []
    assert session.get(f"{BASE}/_sandbox/faults").json() == {"default": {}, "keys": {}}
    assert app.extensions["sandbox"] is state
