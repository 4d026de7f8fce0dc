"""worker/deliverable/report.py: escaping, capped tables, names from definitions, report.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from worker.deliverable.export_file import split_export
from worker.deliverable.report import write_report

SECTION = "usercreated.sections.main-abc"
EMAIL = "com.apsis1.attributes.email"
NOTE = "usercreated.attributes.note-xyz"
PURCHASE = "com.apsis1.events.transaction.custom-purchase-q1"
EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def _export(events: int, *, with_metadata: bool = True) -> dict[str, Any]:
    def profile(email: str, n: int) -> dict[str, Any]:
        return {
            "sections": {
                SECTION: {
                    "attributes": {
                        EMAIL: {
                            "value": email,
                            "history": [
                                {"value": "old@example.com", "changed_at": "2020-01-01T00:00:00Z"},
                                {"value": email, "changed_at": "2021-02-03T04:05:06Z"},
                            ],
                        },
                        NOTE: {"value": EVIL},
                    },
                    "events": [
                        {
                            "discriminator": PURCHASE,
                            "event_time": f"2022-01-01T00:00:{i % 60:02d}Z",
                            "data": {"order": f"o-{i}", "amount": 12.5, "note": "Café ☕"},
                        }
                        for i in range(n)
                    ],
                }
            }
        }

    document: dict[str, Any] = {
        "profiles": {
            "zoe@example.com": profile("zoe@example.com", events),
            "zoe@example.com~merged-1": profile("zoe.old@example.com", 2),
        }
    }
    if with_metadata:
        document["metadata"] = {
            "sections": {
                SECTION: {
                    "attributes": {EMAIL: {"discriminator": EMAIL, "name": "E-mail <address>"}},
                    "events": {PURCHASE: {"discriminator": PURCHASE, "name": "Purchase"}},
                }
            }
        }
    return document


def _render(tmp_path: Path, events: int, *, max_rows: int = 1000, **kw: Any) -> tuple[str, Any]:
    source = tmp_path / "export.json"
    source.write_text(json.dumps(_export(events, **kw), ensure_ascii=False), encoding="utf-8")
    split = split_export(source, tmp_path / "split", requested_key="zoe@example.com")
    files = write_report(
        out_dir=tmp_path / "report",
        job_id="job1",
        reference=EVIL,
        requested_export_key="zoe@example.com",
        account="acme",
        options={"include_attribute_history": True, "include_merged_profiles": True},
        profiles=split.profiles,
        profile_objects=[f"jobs/job1/profiles/{p.index}.json" for p in split.profiles],
        warnings=["a <b>warning</b>"],
        type_definitions_joined=split.has_definitions,
        max_rows=max_rows,
    )
    return files.html.read_text(encoding="utf-8"), json.loads(files.json.read_text("utf-8"))


def test_values_from_apsis_are_escaped_and_no_script_can_run(tmp_path: Path) -> None:
    page, _ = _render(tmp_path, 3)
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "a &lt;b&gt;warning&lt;/b&gt;" in page
    # Self-contained: no external loads, and a CSP forbidding scripts.
    assert "default-src 'none'" in page
    assert "http://" not in page.replace("http-equiv", "")
    assert "https://" not in page


def test_the_person_values_history_and_events_are_in_the_page(tmp_path: Path) -> None:
    page, report = _render(tmp_path, 3)
    for text in ("zoe@example.com", "zoe.old@example.com", "old@example.com", "Café ☕"):
        assert text in page
    assert "2021-02-03T04:05:06Z" in page
    assert "merged" in page
    assert [p["role"] for p in report["profiles"]] == ["requested", "merged"]
    (section,) = report["profiles"][0]["sections"]
    assert section["counts"] == {"attributes": 2, "history_entries": 2, "events": 3}
    assert section["events"][0]["data"] == {"order": "o-0", "amount": 12.5, "note": "Café ☕"}


def test_names_come_from_the_type_definitions(tmp_path: Path) -> None:
    page, report = _render(tmp_path, 1)
    assert "E-mail &lt;address&gt;" in page and "Purchase" in page
    (section,) = report["profiles"][0]["sections"]
    by_disc = {a["discriminator"]: a for a in section["attributes"]}
    assert by_disc[EMAIL]["name"] == "E-mail <address>"
    assert by_disc[NOTE]["name"] is None  # no definition: the discriminator is shown
    assert section["history"][0]["name"] == "E-mail <address>"
    assert section["events"][0]["name"] == "Purchase"


def test_without_definitions_discriminators_are_shown(tmp_path: Path) -> None:
    page, report = _render(tmp_path, 1, with_metadata=False)
    assert "Purchase" not in page and PURCHASE in page
    assert report["type_definitions_joined"] is False


@pytest.mark.parametrize("events", [0, 5, 12])
def test_tables_are_capped_with_a_note_pointing_at_the_document(
    tmp_path: Path, events: int
) -> None:
    page, report = _render(tmp_path, events, max_rows=5)
    section = report["profiles"][0]["sections"][0]
    assert len(section["events"]) == min(events, 5)
    assert section["counts"]["events"] == events
    assert section["omitted"]["events"] == max(0, events - 5)
    note = f"{events - 5:,} more events in <code>jobs/job1/profiles/0.json</code>"
    assert (note in page) == (events > 5)
    assert page.count("<td><code>{&quot;order&quot;") == min(events, 5) + 2  # + the merged
