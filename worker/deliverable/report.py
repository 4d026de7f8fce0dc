"""The readable report of a job: report.html (self-contained) and report.json, streamed.

Both are written by walking each per-profile document with ijson, one section at a time,
so a gigabyte of events renders in flat memory: each table is capped at
``MAX_ROWS_PER_TABLE`` rows and says how many more the profile document holds.
"""

from __future__ import annotations

import functools
import html
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO

import ijson
from ijson.common import ObjectBuilder

from worker.deliverable.export_file import ProfileDocument, SplitResult, sha256_file
from worker.deliverable.storage import Storage
from worker.model.jobs import Job

#: Rows rendered per table (attributes, history entries, events) of one section; the rest
#: stay in the profile document the note points to. 1,000 rows keep a page usable.
MAX_ROWS_PER_TABLE = 1000
#: Characters of one value shown in the HTML (the JSON report and the documents keep it all).
MAX_VALUE_CHARS = 2000
#: Bytes ijson reads per call.
READ_CHUNK_BYTES = 64 * 1024
#: Version of report.json's shape.
REPORT_VERSION = 1

_Event = tuple[str, Any]
_OPEN = ("start_map", "start_array")
_CLOSE = ("end_map", "end_array")

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;
max-width:75rem;padding:0 1rem;color:#1b1f24;background:#fff}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{margin-top:2.5rem;border-bottom:2px solid #d0d7de;
padding-bottom:.3rem}h3{margin-top:1.8rem;font-size:1.05rem}h4{margin:1.2rem 0 .4rem}
table{border-collapse:collapse;width:100%;margin:.3rem 0 1rem;font-size:.9rem}
th,td{border:1px solid #d0d7de;padding:.3rem .5rem;text-align:left;vertical-align:top;
overflow-wrap:break-word;hyphens:none}th{background:#f3f5f7}
code{font-size:.85em;color:#57606a;overflow-wrap:anywhere}
td:last-child{overflow-wrap:anywhere}.num{text-align:right;white-space:nowrap}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem}dt{font-weight:600}
dd{margin:0;overflow-wrap:anywhere}.note{color:#57606a;font-style:italic}
.warn{background:#fff8c5;border:1px solid #d4a72c;padding:.5rem .8rem;margin:.5rem 0}
.role{font-size:.8rem;background:#ddf4ff;border-radius:1rem;padding:.1rem .6rem;
margin-left:.5rem;vertical-align:middle}h2{overflow-wrap:anywhere}
.cover{border:1px solid #d0d7de;border-radius:.5rem;padding:.2rem 1.2rem 1rem;
background:#f6f8fa;margin-bottom:2rem}.cover li{margin:.3rem 0}
@media (max-width:40rem){body{margin:1rem auto;font-size:16px}
dl{grid-template-columns:1fr}dd{margin-bottom:.5rem}
table,tbody,tr,td{display:block;width:auto}thead{display:none}
tr{border:1px solid #d0d7de;border-radius:.4rem;margin:0 0 .6rem;padding:.3rem .5rem}
td{border:0;padding:.15rem 0}
td::before{display:block;font-size:.75rem;font-weight:600;color:#57606a}
table.profiles td:nth-child(2)::before{content:"Role"}
table.profiles td:nth-child(3)::before{content:"Sections"}
table.profiles td:nth-child(4)::before{content:"Attributes"}
table.profiles td:nth-child(5)::before{content:"History entries"}
table.profiles td:nth-child(6)::before{content:"Events"}
table.profiles td:nth-child(7)::before{content:"Document"}
table.history td:nth-child(2)::before{content:"Value"}
table.history td:nth-child(3)::before{content:"Changed at"}
table.events td:nth-child(2)::before{content:"Time"}
table.events td:nth-child(3)::before{content:"Data"}
table.files td:nth-child(2)::before{content:"What it holds"}}
@media print{body{margin:0;max-width:none}}
"""


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    json: Path


@dataclass
class _Section:
    """One section of one profile, its tables capped at ``max_rows`` rows each."""

    discriminator: str
    attributes: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    attribute_count: int = 0
    history_count: int = 0
    event_count: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "discriminator": self.discriminator,
            "counts": {
                "attributes": self.attribute_count,
                "history_entries": self.history_count,
                "events": self.event_count,
            },
            "attributes": self.attributes,
            "history": self.history,
            "events": self.events,
            "omitted": {
                "attributes": self.attribute_count - len(self.attributes),
                "history_entries": self.history_count - len(self.history),
                "events": self.event_count - len(self.events),
            },
        }


def esc(value: object) -> str:
    """HTML-escape any text (quotes too: values may land in attributes)."""
    return html.escape(str(value), quote=True)


def display(value: Any, *, limit: int = MAX_VALUE_CHARS) -> str:
    """A value as a person reads it: strings as they are, anything else as compact JSON."""
    text = value if isinstance(value, str) else compact_json(value)
    if len(text) > limit:
        return text[:limit] + f"… ({len(text) - limit:,} more characters)"
    return text


def compact_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def write_report(
    *,
    out_dir: Path,
    job_id: str,
    reference: str | None,
    requested_export_key: str,
    account: str,
    options: dict[str, bool],
    profiles: Sequence[ProfileDocument],
    profile_objects: Sequence[str],
    warnings: Sequence[str],
    type_definitions_joined: bool,
    generated_at: float | None = None,
    max_rows: int = MAX_ROWS_PER_TABLE,
    cover: str | None = None,
    link_documents: bool = False,
) -> ReportFiles:
    """Write ``out_dir/report.html`` and ``out_dir/report.json`` from the profile documents.

    ``cover``: HTML (escaped already) opening the page, before the report (the package's
    cover page); ``link_documents``: ``profile_objects`` are relative paths, shown as links.
    """
    generated_at = time.time() if generated_at is None else generated_at
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(html=out_dir / "report.html", json=out_dir / "report.json")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(generated_at))
    with (
        files.html.open("w", encoding="utf-8") as page,
        files.json.open("w", encoding="utf-8") as data,
    ):
        _html_head(
            page,
            job_id=job_id,
            reference=reference,
            requested_export_key=requested_export_key,
            account=account,
            options=options,
            profiles=profiles,
            profile_objects=profile_objects,
            warnings=warnings,
            type_definitions_joined=type_definitions_joined,
            when=when,
            cover=cover,
            link_documents=link_documents,
        )
        head = {
            "report_version": REPORT_VERSION,
            "job_id": job_id,
            "reference": reference,
            "requested_export_key": requested_export_key,
            "account": account,
            "options": options,
            "generated_at": generated_at,
            "type_definitions_joined": type_definitions_joined,
            "warnings": list(warnings),
            "max_rows_per_table": max_rows,
        }
        # report.json is written as it goes too: its head, then one section at a time.
        data.write(json.dumps(head, ensure_ascii=False)[:-1] + ',"profiles":[')
        for n, (profile, obj) in enumerate(zip(profiles, profile_objects, strict=True)):
            _html_profile_start(page, profile)
            data.write(("," if n else "") + _profile_json_head(profile, obj) + ',"sections":[')
            for m, section in enumerate(read_sections(profile.path, max_rows=max_rows)):
                _html_section(page, section, obj)
                data.write(("," if m else "") + compact_json(section.to_json()))
            if not profile.sections:
                page.write('<p class="note">No sections.</p>\n')
            data.write("]}")
        data.write("]}\n")
        page.write(
            '<footer><p class="note">Generated by apsis-export. The complete data is in '
            "the profile documents listed above; their SHA-256 digests are in the job's "
            "manifest.json.</p></footer>\n</body>\n</html>\n"
        )
    return files


def _profile_json_head(profile: ProfileDocument, obj: str) -> str:
    head = {
        "export_key": profile.export_key,
        "role": profile.role,
        "object": obj,
        "counts": {
            "sections": profile.counts.sections,
            "attributes": profile.counts.attributes,
            "history_entries": profile.counts.history,
            "events": profile.counts.events,
        },
    }
    return compact_json(head)[:-1]


def _html_head(
    page: TextIO,
    *,
    job_id: str,
    reference: str | None,
    requested_export_key: str,
    account: str,
    options: dict[str, bool],
    profiles: Sequence[ProfileDocument],
    profile_objects: Sequence[str],
    warnings: Sequence[str],
    type_definitions_joined: bool,
    when: str,
    cover: str | None = None,
    link_documents: bool = False,
) -> None:
    # The CSP forbids scripts and every external load: the page stays inert even if a value
    # from APSIS slipped through the escaping.
    page.write(
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>Personal data export: job {esc(job_id)}</title>\n"
        f"<style>{_CSS}</style>\n</head>\n<body>\n"
        f"{cover or ''}"
        "<h1>What APSIS One holds about this person</h1>\n"
        '<p class="note">A summary of the profile export for a data subject access request. '
        "Values are shown as APSIS One returned them.</p>\n<dl>\n"
    )
    rows = [
        ("Requested export key", requested_export_key),
        ("Reference", reference or "—"),
        ("Job", job_id),
        ("APSIS account", account),
        ("Generated", when),
        ("Profiles found", f"{len(profiles)} ({sum(p.role == 'merged' for p in profiles)} merged)"),
        ("Included", ", ".join(k.removeprefix("include_") for k, v in options.items() if v) or "—"),
        ("Names from type definitions", "yes" if type_definitions_joined else "no"),
    ]
    for label, value in rows:
        page.write(f"<dt>{esc(label)}</dt><dd>{esc(value)}</dd>\n")
    page.write("</dl>\n")
    for warning in warnings:
        page.write(f'<p class="warn"><strong>Warning:</strong> {esc(warning)}</p>\n')
    page.write("<h2>Profiles</h2>\n")

    def document(obj: str) -> str:
        code = f"<code>{esc(obj)}</code>"
        return f'<a href="{esc(obj)}">{code}</a>' if link_documents else code

    _table(
        page,
        ("Export key", "Role", "Sections", "Attributes", "History entries", "Events", "Document"),
        (
            (
                esc(profile.export_key),
                esc(profile.role),
                f"{profile.counts.sections:,}",
                f"{profile.counts.attributes:,}",
                f"{profile.counts.history:,}",
                f"{profile.counts.events:,}",
                document(obj),
            )
            for profile, obj in zip(profiles, profile_objects, strict=True)
        ),
        css="profiles",
    )


def _html_profile_start(page: TextIO, profile: ProfileDocument) -> None:
    page.write(
        f'<section>\n<h2>{esc(profile.export_key)}<span class="role">{esc(profile.role)}'
        "</span></h2>\n"
    )


def _table(
    page: TextIO, headers: Sequence[str], rows: Iterable[Sequence[str]], *, css: str = ""
) -> None:
    """An HTML table: ``headers`` as text, each row's cells as HTML already escaped;
    ``css`` names the kind of table (the phone layout labels its cells by it)."""
    heads = "".join(f"<th>{esc(h)}</th>" for h in headers)
    kind = f' class="{esc(css)}"' if css else ""
    page.write(f"<table{kind}>\n<thead><tr>{heads}</tr></thead>\n<tbody>\n")
    for cells in rows:
        page.write("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>\n")
    page.write("</tbody>\n</table>\n")


def _omitted(page: TextIO, shown: int, total: int, what: str, obj: str) -> None:
    if total > shown:
        page.write(
            f'<p class="note">{total - shown:,} more {esc(what)} in <code>{esc(obj)}</code>.</p>\n'
        )


def _label(row: dict[str, Any]) -> str:
    name = row.get("name")
    disc = row.get("discriminator")
    if name:
        return f"{esc(name)}<br><code>{esc(disc)}</code>" if disc else esc(name)
    return f"<code>{esc(disc)}</code>" if disc else "—"


def _html_section(page: TextIO, section: _Section, obj: str) -> None:
    page.write(f"<h3>Section <code>{esc(section.discriminator)}</code></h3>\n")
    page.write(f"<h4>Attributes ({section.attribute_count:,})</h4>\n")
    if section.attributes:
        _table(
            page,
            ("Attribute", "Current value"),
            ((_label(row), esc(display(row["value"]))) for row in section.attributes),
        )
    else:
        page.write('<p class="note">None.</p>\n')
    _omitted(page, len(section.attributes), section.attribute_count, "attributes", obj)
    if section.history_count:
        page.write(f"<h4>Change history ({section.history_count:,})</h4>\n")
        _table(
            page,
            ("Attribute", "Value", "Changed at"),
            (
                (_label(row), esc(display(row["value"])), esc(display(row["changed_at"])))
                for row in section.history
            ),
            css="history",
        )
        _omitted(page, len(section.history), section.history_count, "history entries", obj)
    page.write(f"<h4>Events ({section.event_count:,})</h4>\n")
    if section.events:
        _table(
            page,
            ("Event", "Time", "Data"),
            (
                (
                    _label(row),
                    esc(display(row.get("event_time") or "—")),
                    f"<code>{esc(display(compact_json(row.get('data'))))}</code>",
                )
                for row in section.events
            ),
            css="events",
        )
    else:
        page.write('<p class="note">None.</p>\n')
    _omitted(page, len(section.events), section.event_count, "events", obj)


# -- reading a profile document, one section at a time ------------------------------------


def read_sections(path: Path, *, max_rows: int = MAX_ROWS_PER_TABLE) -> Iterator[_Section]:
    """Yield each section of a profile document (as export_file writes it), capped."""
    with path.open("rb") as f:
        yield from _SectionReader(f, max_rows).run()


class EventWalker:
    """Recursive descent over a stream of ijson events (``_events``): the steps every reader
    of a profile document shares (the report's, the package's CSV files)."""

    _events: Iterator[_Event]

    def _at_sections(self) -> Iterator[None]:
        """Walk the document's top-level map, skipping every member but ``sections``: yields
        once, just inside that map, for the caller to read it to its end."""
        event, _ = next(self._events)
        if event != "start_map":
            return
        for key in self._keys():
            event, _ = next(self._events)
            if key == "sections" and event == "start_map":
                yield
            else:
                self._skip(event)

    def _keys(self) -> Iterator[str]:
        for event, value in self._events:
            if event == "end_map":
                return
            yield value

    def _rest_of_container(self) -> Iterator[_Event]:
        """The events after a container's opening one, up to and including its closing one."""
        depth = 1
        for inner, inner_value in self._events:
            yield inner, inner_value
            if inner in _OPEN:
                depth += 1
            elif inner in _CLOSE:
                depth -= 1
                if depth == 0:
                    return

    def _skip(self, event: str) -> None:
        if event in _OPEN:
            for _ in self._rest_of_container():
                pass

    def _build(self, event: str, value: Any) -> Any:
        if event not in _OPEN:
            return value
        builder = ObjectBuilder()
        builder.event(event, value)
        for inner, inner_value in self._rest_of_container():
            builder.event(inner, inner_value)
        return builder.value


class _SectionReader(EventWalker):
    """Recursive descent over ijson events: builds only the rows it keeps."""

    def __init__(self, f: IO[bytes], max_rows: int) -> None:
        self._events: Iterator[_Event] = iter(
            ijson.basic_parse(f, use_float=True, buf_size=READ_CHUNK_BYTES)
        )
        self._max = max_rows

    def run(self) -> Iterator[_Section]:
        for _ in self._at_sections():
            for disc in self._keys():
                event, _ = next(self._events)
                section = _Section(discriminator=disc)
                if event == "start_map":
                    self._read_section(section)
                else:
                    self._skip(event)
                yield section

    def _read_capped(self, kept: list[dict[str, Any]], row: Callable[[Any], dict[str, Any]]) -> int:
        """Read the array just opened, appending ``row(item)`` while ``kept`` has room for
        it (the rest are skipped unbuilt); return how many items the array held."""
        count = 0
        for event, value in self._events:
            if event == "end_array":
                break
            count += 1
            if len(kept) >= self._max:
                self._skip(event)
                continue
            kept.append(row(self._build(event, value)))
        return count

    def _read_section(self, section: _Section) -> None:
        for key in self._keys():
            event, value = next(self._events)
            if key == "attributes" and event == "start_map":
                for disc in self._keys():
                    event, value = next(self._events)
                    self._read_attribute(section, disc, event, value)
            elif key == "events" and event == "start_array":
                section.event_count += self._read_capped(section.events, _event_row)
            else:
                self._skip(event)

    def _read_attribute(self, section: _Section, disc: str, event: str, value: Any) -> None:
        section.attribute_count += 1
        row: dict[str, Any] = {"discriminator": disc, "name": None, "value": None}
        keep = len(section.attributes) < self._max
        if event != "start_map":
            row["value"] = self._build(event, value)  # a bare value
        else:
            history_start = len(section.history)
            for key in self._keys():
                event, value = next(self._events)
                if key == "history" and event == "start_array":
                    section.history_count += self._read_capped(
                        section.history, functools.partial(_history_row, disc)
                    )
                elif key in ("value", "name") and keep:
                    row[key] = self._build(event, value)
                else:
                    self._skip(event)
            # The name arrives after the history (export_file appends it last).
            for entry in section.history[history_start:]:
                entry["name"] = row["name"]
        if keep:
            section.attributes.append(row)


def _event_row(item: Any) -> dict[str, Any]:
    if isinstance(item, dict):
        return {
            "discriminator": item.get("discriminator"),
            "name": item.get("name"),
            "event_time": item.get("event_time"),
            "data": item.get("data"),
        }
    return {"discriminator": None, "name": None, "event_time": None, "data": item}


def _history_row(disc: str, item: Any) -> dict[str, Any]:
    if isinstance(item, dict):
        return {
            "discriminator": disc,
            "name": None,
            "value": item.get("value"),
            "changed_at": item.get("changed_at"),
        }
    return {"discriminator": disc, "name": None, "value": item, "changed_at": None}


def store_report(storage: Storage, job: Job, split: SplitResult, out_dir: Path) -> dict[str, Any]:
    """Write the job's report.html and report.json and store them; return their manifest
    entries (object, sha256 of the plaintext, bytes) by kind."""
    from worker.deliverable import manifest

    files = write_report(
        out_dir=out_dir,
        job_id=job.job_id,
        reference=job.reference,
        requested_export_key=job.export_key,
        account=job.account,
        options=job.options.to_json(),
        profiles=split.profiles,
        profile_objects=[manifest.profile_object(job.job_id, p.index) for p in split.profiles],
        warnings=manifest.manifest_warnings(job, split),
        type_definitions_joined=split.has_definitions,
    )
    entries: dict[str, Any] = {}
    for kind, path, key, content_type in (
        ("html", files.html, manifest.report_html_object(job.job_id), "text/html; charset=utf-8"),
        ("json", files.json, manifest.report_json_object(job.job_id), "application/json"),
    ):
        sha256, size = sha256_file(path)
        storage.put_file(key, path, content_type=content_type)
        entries[kind] = {"object": key, "sha256": sha256, "bytes": size}
    return entries
