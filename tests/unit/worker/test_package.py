"""worker/deliverable/package.py: the zip a DPO hands over, its CSV files and checksums."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

from worker.deliverable.export_file import split_export
from worker.deliverable.package import CHECKSUMS, INDEX, write_package

SECTION = "usercreated.sections.main-abc"
EVIL_SECTION = "../../etc/passwd"
EMAIL = "com.apsis1.attributes.email"
NOTE = "usercreated.attributes.note-xyz"
PURCHASE = "com.apsis1.events.transaction.custom-purchase-q1"
KEY = "zoe@example.com"


def _export(events: int) -> dict[str, Any]:
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
                        NOTE: {"value": '=HYPERLINK("https://evil.test")'},
                        "usercreated.attributes.score": 42,
                    },
                    "events": [
                        {
                            "discriminator": PURCHASE,
                            "event_time": f"2022-01-01T00:00:{i % 60:02d}Z",
                            "data": {"order": f"o-{i}", "amount": 12.5, "note": "Café ☕"},
                        }
                        for i in range(n)
                    ],
                },
                EVIL_SECTION: {"attributes": {"x": {"value": "Zoë"}}, "events": []},
            }
        }

    return {
        "profiles": {KEY: profile(KEY, events), f"{KEY}~merged-1": profile("z@old.test", 2)},
        "metadata": {
            "sections": {
                SECTION: {
                    "attributes": {EMAIL: {"discriminator": EMAIL, "name": "E-mail"}},
                    "events": {PURCHASE: {"discriminator": PURCHASE, "name": "Purchase"}},
                }
            }
        },
    }


def _package(tmp_path: Path, events: int = 3) -> tuple[zipfile.ZipFile, Any]:
    source = tmp_path / "export.json"
    source.write_text(json.dumps(_export(events), ensure_ascii=False), encoding="utf-8")
    split = split_export(source, tmp_path / "split", requested_key=KEY)
    package = write_package(
        out=tmp_path / "package.zip",
        job_id="job1",
        reference="GDPR-1",
        requested_export_key=KEY,
        account="acme",
        options={"include_attribute_history": True},
        split=split,
        warnings=[],
        generated_at=1_700_000_000,
    )
    return zipfile.ZipFile(package.path), package


def _csv(zf: zipfile.ZipFile, name: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(zf.read(name).decode("utf-8-sig"))))


def test_checksums_cover_every_file_and_match(tmp_path: Path) -> None:
    zf, package = _package(tmp_path)
    names = set(zf.namelist())
    listed = {}
    for line in zf.read(CHECKSUMS).decode().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    assert set(listed) == names - {CHECKSUMS}
    for name, digest in listed.items():
        assert hashlib.sha256(zf.read(name)).hexdigest() == digest, name
    assert package.sha256 == hashlib.sha256(package.path.read_bytes()).hexdigest()
    assert {f.name for f in package.files} == names


def test_profiles_are_the_split_documents_and_index_opens_with_a_cover(tmp_path: Path) -> None:
    zf, _ = _package(tmp_path)
    assert json.loads(zf.read("profiles/0.json"))["export_key"] == KEY
    assert json.loads(zf.read("profiles/1.json"))["role"] == "merged"
    page = zf.read(INDEX).decode()
    assert page.index("Your personal data") < page.index("What APSIS One holds")
    assert "2023-11-14 22:13 UTC" in page and "GDPR-1" in page
    assert '<a href="profiles/0.json">' in page
    for name in zf.namelist():
        if name != INDEX:
            assert f'href="{name}"' in page, f"{name} not described on the cover"


def test_csv_files_hold_the_persons_data_with_names_as_headers(tmp_path: Path) -> None:
    zf, _ = _package(tmp_path, events=5)
    folder = "csv/profile-0/1-usercreated.sections.main-abc"
    header, values = _csv(zf, f"{folder}/attributes.csv")
    assert header == ["E-mail", NOTE, "usercreated.attributes.score"]
    # A formula from APSIS is written as text, never run by a spreadsheet.
    assert values == [KEY, '\'=HYPERLINK("https://evil.test")', "42"]
    history = _csv(zf, f"{folder}/history.csv")
    assert history[0] == ["attribute", "discriminator", "changed_at", "value"]
    assert history[1:] == [
        ["E-mail", EMAIL, "2020-01-01T00:00:00Z", "old@example.com"],
        ["E-mail", EMAIL, "2021-02-03T04:05:06Z", KEY],
    ]
    events = _csv(zf, f"{folder}/events.csv")
    assert len(events) == 6
    assert events[1][:3] == ["Purchase", PURCHASE, "2022-01-01T00:00:00Z"]
    assert json.loads(events[1][3]) == {"order": "o-0", "amount": 12.5, "note": "Café ☕"}
    merged = _csv(zf, "csv/profile-1/1-usercreated.sections.main-abc/attributes.csv")
    assert merged[1][0] == "z@old.test"


def test_a_section_name_from_apsis_cannot_leave_the_package_folder(tmp_path: Path) -> None:
    zf, _ = _package(tmp_path)
    for name in zf.namelist():
        assert not name.startswith("/") and ".." not in name.split("/"), name
    assert _csv(zf, "csv/profile-0/2-etc_passwd/attributes.csv") == [["x"], ["Zoë"]]
