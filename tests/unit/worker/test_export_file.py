"""worker/deliverable/export_file.py: splitting, counts, names, exact values, corruption."""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from worker.deliverable.export_file import Counts, sha256_file, split_export
from worker.errors import CorruptExport

SECTION = "usercreated.sections.my_section-h4h3dpu3qi"
EMAIL = "com.apsis1.attributes.email"
SCORE = "com.apsis1.attributes.score"
PURCHASE = "com.apsis1.events.transaction.custom-my-transaction-l9ce3syo6t"
UNKNOWN_EVENT = "com.apsis1.events.unknown"


def _profile(email: str, *, events: int) -> str:
    event = (
        '{"discriminator": "' + PURCHASE + '", "event_time": "2024-01-02T03:04:05Z", '
        '"data": {"amount": 1234.50, "big": 12345678901234567890, "tiny": 1.0E-7, '
        '"ok": true, "none": null, "note": "Åsa \\u00e9\\"q\\" 😀"}}'
    )
    unknown = '{"discriminator": "' + UNKNOWN_EVENT + '", "event_time": "2024-01-01T00:00:00Z"}'
    return (
        '{"sections": {"' + SECTION + '": {"attributes": {'
        '"' + EMAIL + '": {"value": ' + json.dumps(email, ensure_ascii=False) + ', "history": ['
        '{"value": "old@example.com", "changed_at": "2020-01-01T00:00:00Z"},'
        '{"value": "older@example.com", "changed_at": "2019-01-01T00:00:00Z"}]},'
        '"' + SCORE + '": {"value": 42.10}}, '
        '"events": [' + ",".join([event] * events + [unknown]) + "]}}}"
    )


METADATA = (
    '{"sections": {"' + SECTION + '": {'
    '"attributes": {"' + EMAIL + '": {"discriminator": "' + EMAIL + '", "name": "Email", '
    '"versions": [{"id": 1, "deprecated_at": null}]}},'
    '"events": {"' + PURCHASE + '": {"discriminator": "' + PURCHASE + '", "name": "Purchase"}}}}}'
)


def _write(tmp_path: Path, text: str | bytes, name: str = "export.json") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def _load(path: Path) -> Any:
    return json.loads(path.read_bytes().decode("utf-8"), parse_float=Decimal)


@pytest.fixture
def export_with_merged(tmp_path: Path) -> Path:
    # The merged profile comes first: the requested key need not lead.
    text = (
        '{"profiles": {"merged-key": ' + _profile("mërged@example.com", events=1) + ", "
        '"requested-key": ' + _profile("requested@example.com", events=3) + "}, "
        '"metadata": ' + METADATA + "}"
    )
    return _write(tmp_path, text)


def test_each_export_key_gets_its_own_document_with_its_role(
    export_with_merged: Path, tmp_path: Path
) -> None:
    result = split_export(export_with_merged, tmp_path / "out", requested_key="requested-key")

    assert result.requested_found
    assert result.has_definitions
    assert [(p.index, p.export_key, p.role) for p in result.profiles] == [
        (0, "merged-key", "merged"),
        (1, "requested-key", "requested"),
    ]
    for profile in result.profiles:
        assert profile.path == tmp_path / "out" / "profiles" / f"{profile.index}.json"
        document = _load(profile.path)
        assert document["export_key"] == profile.export_key
        assert document["role"] == profile.role
        assert set(document) == {"export_key", "role", "sections"}
    merged = _load(result.profiles[0].path)
    assert merged["sections"][SECTION]["attributes"][EMAIL]["value"] == "mërged@example.com"


def test_counts_per_profile_and_per_section(export_with_merged: Path, tmp_path: Path) -> None:
    result = split_export(export_with_merged, tmp_path / "out", requested_key="requested-key")

    requested = result.profiles[1]
    expected = Counts(sections=1, attributes=2, history=2, events=4)
    assert requested.counts == expected
    assert requested.sections == {SECTION: expected}
    assert result.profiles[0].counts.events == 2


def test_size_and_sha256_describe_the_written_document(
    export_with_merged: Path, tmp_path: Path
) -> None:
    result = split_export(export_with_merged, tmp_path / "out", requested_key="requested-key")

    for profile in result.profiles:
        data = profile.path.read_bytes()
        assert profile.bytes == len(data)
        assert profile.sha256 == hashlib.sha256(data).hexdigest()
        assert sha256_file(profile.path) == (profile.sha256, profile.bytes)


def test_names_are_joined_from_the_definitions(export_with_merged: Path, tmp_path: Path) -> None:
    result = split_export(export_with_merged, tmp_path / "out", requested_key="requested-key")

    section = _load(result.profiles[1].path)["sections"][SECTION]
    assert section["attributes"][EMAIL]["name"] == "Email"
    assert "name" not in section["attributes"][SCORE]  # no definition for it
    assert [e.get("name") for e in section["events"]] == ["Purchase"] * 3 + [None]


def test_without_metadata_nothing_is_named(tmp_path: Path) -> None:
    source = _write(tmp_path, '{"profiles": {"k": ' + _profile("a@example.com", events=1) + "}}")

    result = split_export(source, tmp_path / "out", requested_key="k")

    assert not result.has_definitions
    section = _load(result.profiles[0].path)["sections"][SECTION]
    assert "name" not in section["attributes"][EMAIL]
    assert all("name" not in e for e in section["events"])


def test_unicode_and_decimal_numbers_survive_exactly(
    export_with_merged: Path, tmp_path: Path
) -> None:
    result = split_export(export_with_merged, tmp_path / "out", requested_key="requested-key")

    raw = result.profiles[1].path.read_bytes().decode("utf-8")
    # Numbers keep their exact digits (no float round trip), text stays unescaped UTF-8.
    assert '"amount":1234.50' in raw
    assert '"big":12345678901234567890' in raw
    assert '"value":42.10' in raw
    assert 'Åsa é\\"q\\" 😀' in raw
    data = _load(result.profiles[1].path)["sections"][SECTION]["events"][0]["data"]
    assert data == {
        "amount": Decimal("1234.50"),
        "big": 12345678901234567890,
        "tiny": Decimal("1.0E-7"),
        "ok": True,
        "none": None,
        "note": 'Åsa é"q" 😀',
    }


def test_bare_value_attributes_and_missing_events_are_tolerated(tmp_path: Path) -> None:
    text = (
        '{"metadata": ' + METADATA + ', "profiles": {"k": {"sections": {'
        '"' + SECTION + '": {"attributes": {"' + EMAIL + '": "bare@example.com", "n": 7}},'
        '"other": {"attributes": {}, "events": []}}}}}'
    )
    result = split_export(_write(tmp_path, text), tmp_path / "out", requested_key="k")

    (profile,) = result.profiles
    section = _load(profile.path)["sections"][SECTION]
    assert section == {"attributes": {EMAIL: "bare@example.com", "n": 7}}
    assert profile.counts == Counts(sections=2, attributes=2, history=0, events=0)
    assert profile.sections["other"] == Counts(sections=1)


def test_empty_profiles_is_valid_and_reports_the_key_missing(tmp_path: Path) -> None:
    result = split_export(_write(tmp_path, '{"profiles": {}}'), tmp_path / "out", requested_key="k")

    assert result.profiles == []
    assert not result.requested_found


def test_only_merged_profiles_reports_the_requested_key_missing(tmp_path: Path) -> None:
    text = '{"profiles": {"other": {"sections": {}}}}'
    result = split_export(_write(tmp_path, text), tmp_path / "out", requested_key="k")

    assert [p.role for p in result.profiles] == ["merged"]
    assert not result.requested_found


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "not valid JSON"),
        ('{"profiles": {"secret-key": {"sections": {"s": {"events": [{"a": 1}', "not valid JSON"),
        (
            '{"profiles": {"secret-key": {"sections": {"s": {"events": [1 @@ 2]}}}}}',
            "not valid JSON",
        ),
        ('{"profiles": {"secret-key": {"sections": {}}}} trailing', "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"metadata": {}}', "no 'profiles' object"),
        ('{"profiles": []}', "'profiles' is not an object"),
        ('{"profiles": {"secret-key": "x"}}', "profile #0 is not an object"),
        ('{"profiles": {"secret-key": {"sections": []}}}', "'sections' that is not an object"),
    ],
)
def test_corrupt_files_are_refused_without_naming_the_key(
    tmp_path: Path, text: str, reason: str
) -> None:
    with pytest.raises(CorruptExport, match=reason) as caught:
        split_export(_write(tmp_path, text), tmp_path / "out", requested_key="secret-key")

    assert "secret-key" not in str(caught.value)


def test_garbage_in_the_middle_of_a_large_file_is_refused_and_cleaned_up(
    tmp_path: Path,
) -> None:
    good = '{"profiles": {"k": ' + _profile("a@example.com", events=5000) + "}}"
    middle = len(good) // 2
    broken = good[:middle] + "\x00garbage}}" + good[middle:]

    with pytest.raises(CorruptExport, match="near byte"):
        split_export(_write(tmp_path, broken), tmp_path / "out", requested_key="k")

    assert list((tmp_path / "out").rglob("*.json")) == []


def test_a_refused_file_leaves_no_documents_behind(tmp_path: Path) -> None:
    text = '{"profiles": {"k": ' + _profile("a@example.com", events=10) + ', "k2": 5}}'

    with pytest.raises(CorruptExport, match="profile #1 is not an object"):
        split_export(_write(tmp_path, text), tmp_path / "out", requested_key="k")

    assert list((tmp_path / "out").rglob("*.json")) == []


def test_invalid_utf8_is_refused(tmp_path: Path) -> None:
    source = _write(tmp_path, b'{"profiles": {"k": {"sections": {"\xff\xfe": {}}}}}')

    with pytest.raises(CorruptExport):
        split_export(source, tmp_path / "out", requested_key="k")


def test_a_multi_megabyte_file_splits_into_exact_documents(tmp_path: Path) -> None:
    keys = [f"key-{n}" for n in range(3)]
    profiles = ", ".join(
        json.dumps(key) + ": " + _profile(f"{key}@example.com", events=4000) for key in keys
    )
    source = _write(tmp_path, '{"profiles": {' + profiles + '}, "metadata": ' + METADATA + "}")
    assert source.stat().st_size > 3_000_000

    result = split_export(source, tmp_path / "out", requested_key="key-2")

    assert [p.role for p in result.profiles] == ["merged", "merged", "requested"]
    for profile in result.profiles:
        original = json.loads(
            _profile(f"{profile.export_key}@example.com", events=4000), parse_float=Decimal
        )
        written = _load(profile.path)["sections"][SECTION]
        assert [e.get("data") for e in written["events"]] == [
            e.get("data") for e in original["sections"][SECTION]["events"]
        ]
        assert profile.counts == Counts(sections=1, attributes=2, history=2, events=4001)
        assert sha256_file(profile.path) == (profile.sha256, profile.bytes)


def test_sha256_file_streams_size_and_digest(tmp_path: Path) -> None:
    data = b"x" * (3 * 1024 * 1024 + 17)
    path = _write(tmp_path, data, "blob.bin")

    assert sha256_file(path) == (hashlib.sha256(data).hexdigest(), len(data))
