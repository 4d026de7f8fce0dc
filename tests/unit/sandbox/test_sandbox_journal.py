"""Tests for sandbox/journal.py: sequence numbers, filters and waiting, across threads."""

from __future__ import annotations

import threading

import pytest

from sandbox.journal import Journal


def test_seq_increases_and_survives_clear() -> None:
    journal = Journal()
    first = journal.record({"kind": "token"})
    journal.clear()
    second = journal.record({"kind": "export"})
    assert second["seq"] > first["seq"]
    assert [e["kind"] for e in journal.entries()] == ["export"]
    assert "ts" in second


def test_since_and_kind_filters() -> None:
    journal = Journal()
    for kind in ("token", "export", "export"):
        journal.record({"kind": kind})
    assert [e["seq"] for e in journal.entries(since=1)] == [2, 3]
    assert len(journal.entries(kind="token")) == 1


def test_concurrent_records_get_unique_seqs() -> None:
    journal = Journal()
    threads = [
        threading.Thread(target=lambda: [journal.record({"kind": "other"}) for _ in range(200)])
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seqs = [e["seq"] for e in journal.entries()]
    assert sorted(seqs) == list(range(1, 1601))


def test_wait_for_times_out() -> None:
    with pytest.raises(TimeoutError):
        Journal().wait_for(bool, timeout=0.01)
