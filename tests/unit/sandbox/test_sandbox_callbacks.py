"""Tests for sandbox/callbacks.py: ordering by due time and retries of failed deliveries."""

from __future__ import annotations

import requests
from conftest import CallbackSink, request_export

from sandbox.callbacks import Callback, CallbackScheduler
from sandbox.journal import Journal
from sandbox.state import SandboxState


def _callback(code: int) -> Callback:
    return Callback(
        url="http://r.test/cb",
        body={"code": code, "message": "m"},
        account="a",
        export_key="K",
        definition_id="d",
    )


def test_callbacks_are_sent_in_due_order() -> None:
    sink = CallbackSink()
    scheduler = CallbackScheduler(Journal(), sink, retries=0, backoff=0.0)
    scheduler.schedule(_callback(2), 0.05)
    scheduler.schedule(_callback(1), 0.0)
    assert scheduler.wait_idle()
    scheduler.stop()
    assert sink.codes() == [1, 2]


def test_5xx_and_connection_errors_are_retried_then_given_up() -> None:
    sink = CallbackSink()
    sink.statuses = [503, ConnectionError("refused"), 500, 502]
    journal = Journal()
    scheduler = CallbackScheduler(journal, sink, retries=3, backoff=0.001)
    scheduler.schedule(_callback(200), 0.0)
    assert scheduler.wait_idle()
    scheduler.stop()
    attempts = [(e["attempt"], e["status"]) for e in journal.entries(kind="callback")]
    assert attempts == [(1, 503), (2, None), (3, 500), (4, 502)]


def test_4xx_is_not_retried() -> None:
    sink = CallbackSink()
    sink.statuses = [404]
    journal = Journal()
    scheduler = CallbackScheduler(journal, sink, retries=3, backoff=0.001)
    scheduler.schedule(_callback(100), 0.0)
    assert scheduler.wait_idle()
    scheduler.stop()
    assert len(journal.entries()) == 1


def test_app_retries_with_configured_count(
    session: requests.Session, headers: dict[str, str], sink: CallbackSink, state: SandboxState
) -> None:
    state.patch_config({"callback_retries": 1})
    state.set_faults({"default": {"drop_ready": True}})
    sink.statuses = [500, 500]
    request_export(session, headers)
    assert state.scheduler.wait_idle()
    assert [e["attempt"] for e in state.journal.entries(kind="callback")] == [1, 2]
