"""The data-subject package: the one file a DPO hands over (``jobs/<job_id>/package.zip``).

It holds ``index.html`` (the report, opening with a plain-language cover page), the profile
documents as JSON (art. 15 copy), per profile and section CSV files of attribute values,
attribute history and events (art. 20) and ``checksums.sha256`` over every other file
(``sha256sum -c checksums.sha256``). Written streamed to a zip on disk, member by member, so
memory stays flat whatever the export's size; then uploaded (multipart) like any object.
"""

from __future__ import annotations

import hashlib
import re
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import ijson

from worker.deliverable import csv_cells, manifest
from worker.deliverable.export_file import ProfileDocument, SplitResult, sha256_file
from worker.deliverable.report import EventWalker, compact_json, esc, write_report
from worker.deliverable.storage import Storage
from worker.model.jobs import Job

#: Version of the package's layout; bumped when a file moves or changes meaning.
PACKAGE_VERSION = 1
INDEX = "index.html"
CHECKSUMS = "checksums.sha256"
#: Where the person's data comes from, as the cover page names it.
SERVICE = "APSIS One"
#: Bytes ijson reads per call.
READ_CHUNK_BYTES = 64 * 1024
#: Characters of CSV text buffered before they are encoded, hashed and compressed.
CSV_FLUSH_CHARS = 64 * 1024
#: Longest part of a section discriminator kept in a folder name (the rest is cut).
MAX_SLUG_CHARS = 60
#: CSV files start with a byte-order mark: Excel reads UTF-8 ("Zoë") only with one;
#: other tools (LibreOffice, pandas, Python's ``utf-8-sig``) skip it.
CSV_ENCODING = "utf-8-sig"
HISTORY_COLUMNS = ("attribute", "discriminator", "changed_at", "value")
EVENT_COLUMNS = ("event", "discriminator", "event_time", "data")

_Event = tuple[str, Any]


@dataclass(frozen=True)
class PackageFile:
    """One file of the package: its path inside the zip, digest, size and what it holds."""

    name: str
    sha256: str
    bytes: int
    holds: str


@dataclass(frozen=True)
class Package:
    """The zip written on disk, its digest and size, and the files in it."""

    path: Path
    sha256: str
    bytes: int
    files: list[PackageFile]


def document_name(index: int) -> str:
    """Path inside the package of profile document ``index`` (as in the job's folder)."""
    return f"profiles/{index}.json"


def section_folder(profile_index: int, section_number: int, discriminator: str) -> str:
    """``csv/profile-<n>/<m>-<discriminator, made safe>``: no ``/`` or ``..`` from APSIS."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", discriminator)[:MAX_SLUG_CHARS].strip("._") or "x"
    return f"csv/profile-{profile_index}/{section_number}-{slug}"


def cell(value: Any) -> str:
    """A value as one CSV cell: text as it is, null empty, anything else compact JSON."""
    if value is None:
        return ""
    return value if isinstance(value, str) else compact_json(value)


def write_package(
    *,
    out: Path,
    job_id: str,
    reference: str | None,
    requested_export_key: str,
    account: str,
    options: dict[str, bool],
    split: SplitResult,
    warnings: Sequence[str],
    generated_at: float | None = None,
    progress: Callable[[], None] = lambda: None,
) -> Package:
    """Write the package zip to ``out`` (its folder also takes the page before it is zipped)."""
    generated_at = time.time() if generated_at is None else generated_at
    files: list[PackageFile] = []
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        for profile in split.profiles:
            name = document_name(profile.index)
            zf.write(profile.path, name)
            files.append(
                PackageFile(
                    name,
                    profile.sha256,
                    profile.bytes,
                    f"all data of profile {profile.index + 1} ({profile.role}) as {SERVICE} "
                    "returned it, in JSON",
                )
            )
            progress()
        for profile in split.profiles:
            _ProfileCsv(zf, profile, split.attribute_names, files.append).run()
            progress()
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(generated_at))
        page = write_report(
            out_dir=out.parent / "package-page",
            job_id=job_id,
            reference=reference,
            requested_export_key=requested_export_key,
            account=account,
            options=options,
            profiles=split.profiles,
            profile_objects=[document_name(p.index) for p in split.profiles],
            warnings=warnings,
            type_definitions_joined=split.has_definitions,
            generated_at=generated_at,
            cover=_cover(files, when=when, reference=reference),
            link_documents=True,
        ).html
        sha256, size = sha256_file(page)
        zf.write(page, INDEX)
        files.insert(0, PackageFile(INDEX, sha256, size, "this page: start here"))
        progress()
        # sha256sum's format: "<hex>  <path>" (two spaces: text mode), one file a line.
        checksums = "".join(f"{f.sha256}  {f.name}\n" for f in files).encode()
        zf.writestr(CHECKSUMS, checksums)
    files.append(
        PackageFile(
            CHECKSUMS,
            hashlib.sha256(checksums).hexdigest(),
            len(checksums),
            "the SHA-256 of every other file",
        )
    )
    sha256, size = sha256_file(out)
    return Package(path=out, sha256=sha256, bytes=size, files=files)


def _cover(files: Sequence[PackageFile], *, when: str, reference: str | None) -> str:
    """The cover page: what this is, where it comes from, when it was made, what is in it."""
    rows = "".join(
        f'<tr><td><a href="{esc(f.name)}"><code>{esc(f.name)}</code></a></td>'
        f"<td>{esc(f.holds)}</td></tr>\n"
        for f in [
            PackageFile(INDEX, "", 0, "this page: start here"),
            *files,
            PackageFile(CHECKSUMS, "", 0, "the SHA-256 of every other file"),
        ]
    )
    ref = f" Reference: <strong>{esc(reference)}</strong>." if reference else ""
    return (
        '<section class="cover">\n<h1>Your personal data</h1>\n'
        f"<p>This package is a copy of the personal data that <strong>{esc(SERVICE)}</strong> "
        "(the customer-engagement platform of the organisation that sent it to you) holds "
        "about you. It answers your request under the GDPR: the right of access (article 15) "
        "and the right to data portability (article 20).</p>\n"
        f"<p>It was made on <strong>{esc(when)}</strong>.{ref}</p>\n"
        "<ul>\n<li>Read it here: below this box is a summary of every profile, its "
        "attributes (such as your name or e-mail address), their earlier values and the "
        "events recorded (such as e-mails opened or purchases). Long tables are cut; the "
        "files hold everything.</li>\n"
        "<li>Take it elsewhere: the <code>.csv</code> files open in any spreadsheet, and the "
        "<code>.json</code> files are the complete data in a format other services can "
        "import. In the spreadsheet files, a value starting with = + - or @ (a phone number "
        "such as +46…) begins with an apostrophe, so no spreadsheet runs it as a formula; "
        "the <code>.json</code> files hold every value exactly.</li>\n"
        "<li>Check it is complete and unchanged: <code>sha256sum -c checksums.sha256</code> "
        "(Linux, macOS: <code>shasum -a 256 -c</code>) in the unzipped folder.</li>\n</ul>\n"
        '<h2>What each file holds</h2>\n<table class="files">\n<thead><tr><th>File</th>'
        f"<th>What it holds</th></tr></thead>\n<tbody>\n{rows}</tbody>\n</table>\n"
        "</section>\n"
    )


class _Member:
    """A CSV file streamed into the zip: text buffered, encoded, hashed, then compressed."""

    def __init__(self, zf: zipfile.ZipFile, name: str, header: Sequence[str]) -> None:
        self.name = name
        # force_zip64: its size is not known up front and may pass 4 GiB.
        self._out: IO[bytes] = zf.open(name, "w", force_zip64=True)
        self._hash = hashlib.sha256()
        self._pending: list[str] = []
        self._chars = 0
        self.bytes = 0
        self.rows = 0
        self._write_bytes("\ufeff".encode() if CSV_ENCODING == "utf-8-sig" else b"")
        self._csv = csv_cells.writer(cast(Any, self))
        self._csv.writerow(header)

    def write(self, text: str) -> int:
        self._pending.append(text)
        self._chars += len(text)
        if self._chars >= CSV_FLUSH_CHARS:
            self._flush()
        return len(text)

    def row(self, cells: Sequence[Any]) -> None:
        self.rows += 1
        self._csv.writerow(cells)

    def _flush(self) -> None:
        # A lone surrogate from a JSON "\ud800" escape cannot be UTF-8: written escaped.
        self._write_bytes("".join(self._pending).encode("utf-8", "backslashreplace"))
        self._pending.clear()
        self._chars = 0

    def _write_bytes(self, data: bytes) -> None:
        self._hash.update(data)
        self._out.write(data)
        self.bytes += len(data)

    def close(self, holds: str) -> PackageFile:
        self._flush()
        self._out.close()
        return PackageFile(self.name, self._hash.hexdigest(), self.bytes, holds)


class _ProfileCsv(EventWalker):
    """Walk one profile document (ijson events, never the whole of it) into CSV members.

    Per section: ``history.csv`` streams while the attributes are read, then
    ``attributes.csv`` (one column per attribute, named from the type definitions where
    known: the section's current values are held until its attributes end, one value each),
    then ``events.csv`` streams. Only one member is open at a time, as zipfile requires.
    """

    def __init__(
        self,
        zf: zipfile.ZipFile,
        profile: ProfileDocument,
        names: dict[tuple[str, str], str],
        add: Callable[[PackageFile], None],
    ) -> None:
        self._zf = zf
        self._profile = profile
        self._names = names
        self._add = add
        self._events: Iterator[_Event] = iter(())

    def run(self) -> None:
        with self._profile.path.open("rb") as f:
            self._events = iter(ijson.basic_parse(f, use_float=True, buf_size=READ_CHUNK_BYTES))
            for _ in self._at_sections():
                self._sections()

    def _what(self, section: str) -> str:
        return f"profile {self._profile.index + 1} ({self._profile.role}), section {section}"

    def _sections(self) -> None:
        for number, section in enumerate(self._keys(), start=1):
            event, _ = next(self._events)
            if event != "start_map":
                self._skip(event)
                continue
            folder = section_folder(self._profile.index, number, section)
            for key in self._keys():
                event, _ = next(self._events)
                if key == "attributes" and event == "start_map":
                    self._attributes(section, folder)
                elif key == "events" and event == "start_array":
                    self._section_events(section, folder)
                else:
                    self._skip(event)

    def _attributes(self, section: str, folder: str) -> None:
        headers: list[str] = []
        values: list[str] = []
        history: _Member | None = None
        for disc in self._keys():
            event, value = next(self._events)
            name = self._names.get((section, disc))
            current: Any = None
            if event != "start_map":
                current = self._build(event, value)  # a bare value
            else:
                for key in self._keys():
                    event, value = next(self._events)
                    if key == "history" and event == "start_array":
                        for inner, inner_value in self._until_array_end():
                            item = self._build(inner, inner_value)
                            if history is None:
                                history = _Member(
                                    self._zf, f"{folder}/history.csv", HISTORY_COLUMNS
                                )
                            changed = item.get("changed_at") if isinstance(item, dict) else None
                            old = item.get("value") if isinstance(item, dict) else item
                            history.row([name or disc, disc, cell(changed), cell(old)])
                    elif key == "value":
                        current = self._build(event, value)
                    elif key == "name" and name is None:
                        own = self._build(event, value)
                        name = own if isinstance(own, str) else None
                    else:
                        self._skip(event)
            header = name or disc
            headers.append(f"{header} ({disc})" if header in headers else header)
            values.append(cell(current))
        if history is not None:
            self._add(history.close(f"earlier values of attributes: {self._what(section)}"))
        if headers:
            member = _Member(self._zf, f"{folder}/attributes.csv", headers)
            member.row(values)
            self._add(member.close(f"current attribute values: {self._what(section)}"))

    def _section_events(self, section: str, folder: str) -> None:
        member: _Member | None = None
        for event, value in self._until_array_end():
            item = self._build(event, value)
            if member is None:
                member = _Member(self._zf, f"{folder}/events.csv", EVENT_COLUMNS)
            if isinstance(item, dict):
                disc = item.get("discriminator")
                label = item.get("name") or disc
                member.row(
                    [cell(label), cell(disc), cell(item.get("event_time")), cell(item.get("data"))]
                )
            else:
                member.row(["", "", "", cell(item)])
        if member is not None:
            self._add(member.close(f"events: {self._what(section)}"))

    # -- ijson plumbing -----------------------------------------------------------------

    def _until_array_end(self) -> Iterator[_Event]:
        """The first event of each item of the array just opened."""
        for event, value in self._events:
            if event == "end_array":
                return
            yield event, value


def store_package(
    storage: Storage,
    job: Job,
    split: SplitResult,
    tmp: Path,
    *,
    warnings: Sequence[str],
    progress: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Write the job's package and store it as ``jobs/<job_id>/package.zip``; return its
    manifest entry (object, sha256 and size of the zip, how many files it holds)."""
    folder = tmp / "package"
    folder.mkdir(parents=True, exist_ok=True)
    package = write_package(
        out=folder / "package.zip",
        job_id=job.job_id,
        reference=job.reference,
        requested_export_key=job.export_key,
        account=job.account,
        options=job.options.to_json(),
        split=split,
        warnings=warnings,
        progress=progress,
    )
    key = manifest.package_object(job.job_id)
    storage.put_file(
        key, package.path, content_type="application/zip", progress=lambda _: progress()
    )
    return {
        "object": key,
        "sha256": package.sha256,
        "bytes": package.bytes,
        "files": len(package.files),
        "package_version": PACKAGE_VERSION,
    }
