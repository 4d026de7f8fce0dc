"""Verify an APSIS One export file and split it, streamed, into one JSON document per export key."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from pathlib import Path
from typing import IO, Any, Literal

import ijson

from worker.errors import CorruptExport

#: Bytes ijson reads from the export file per call (the parser's input buffer); 64 KiB
#: parsed faster here than 1 MiB (likely CPU cache) and keeps peak RSS near 20 MiB.
READ_CHUNK_BYTES = 64 * 1024
#: Output fragments (keys, values, punctuation) buffered before they are encoded, hashed
#: and written: about 64 KiB of typical export JSON. Counted in fragments, not bytes, so
#: the per-event hot path does no length bookkeeping; one value larger than that (a huge
#: event) is buffered whole.
WRITE_CHUNK_FRAGMENTS = 4096
#: Bytes read per call when hashing a file.
HASH_CHUNK_BYTES = 1024 * 1024

Role = Literal["requested", "merged"]
#: One ijson ``basic_parse`` event: (event name, value).
_Event = tuple[str, Any]

# Keys the split document sets itself; a profile key of the same name would shadow them.
_RESERVED_KEYS = frozenset({"export_key", "role"})


@dataclass(frozen=True)
class Counts:
    """How much one profile (or one of its sections) holds."""

    sections: int = 0
    attributes: int = 0
    #: Entries in every attribute's ``history`` list.
    history: int = 0
    events: int = 0


@dataclass(frozen=True)
class ProfileDocument:
    """One export key's data, written as its own JSON document."""

    export_key: str
    #: 0-based order of appearance under ``profiles``; also the file name.
    index: int
    role: Role
    path: Path
    #: Size of the written document in bytes.
    bytes: int
    #: Hex SHA-256 of the written document.
    sha256: str
    counts: Counts
    #: Counts per section discriminator (each with ``sections=1``); they add up to ``counts``.
    sections: dict[str, Counts]


@dataclass(frozen=True)
class SplitResult:
    """Every profile found in an export file, in order of appearance."""

    profiles: list[ProfileDocument]
    #: The file carried ``metadata`` (type definitions), so names were joined in.
    has_definitions: bool
    requested_found: bool
    #: Attribute names from the type definitions by (section, attribute discriminator).
    attribute_names: dict[tuple[str, str], str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Definitions:
    """Attribute and event names by (section discriminator, discriminator)."""

    attributes: dict[tuple[str, str], str]
    events: dict[tuple[str, str], str]


class _DocumentWriter:
    """Buffers output text, then encodes, hashes and writes it in chunks."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._pending: list[str] = []
        self._hash = hashlib.sha256()
        self.bytes = 0
        # Bound method kept as an attribute: the copy loop calls it once per parse event.
        self.write = self._pending.append

    def maybe_flush(self) -> None:
        # Called between items (events, attributes), never per parse event.
        if len(self._pending) >= WRITE_CHUNK_FRAGMENTS:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        # A lone surrogate (from a "\ud800" escape) cannot be UTF-8; backslashreplace
        # turns it back into the same JSON escape.
        chunk = "".join(self._pending).encode("utf-8", "backslashreplace")
        self._pending.clear()
        self._hash.update(chunk)
        self._file.write(chunk)
        self.bytes += len(chunk)

    def hexdigest(self) -> str:
        self.flush()
        return self._hash.hexdigest()


class _SectionTally:
    """Mutable counts for one section while it is being written."""

    __slots__ = ("attributes", "events", "history")

    def __init__(self) -> None:
        self.attributes = 0
        self.history = 0
        self.events = 0


def split_export(source: Path, out_dir: Path, *, requested_key: str) -> SplitResult:
    """Verify ``source`` and write ``out_dir/profiles/<n>.json`` for each export key.

    Two passes: a C-speed one that reads only ``metadata`` (the definitions), then one
    that re-emits every profile's parse events to its own file, never holding a profile.
    Raises ``CorruptExport`` (and removes what it wrote) when the file is not the JSON
    APSIS documents.
    """
    definitions = _read_definitions(source)
    profiles_dir = out_dir / "profiles"
    profiles_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        with source.open("rb") as f:
            events: Iterator[_Event] = iter(
                ijson.basic_parse(f, use_float=False, buf_size=READ_CHUNK_BYTES)
            )
            splitter = _Splitter(events, profiles_dir, requested_key, definitions, written)
            try:
                profiles = splitter.run()
            except (ijson.JSONError, UnicodeError) as exc:
                raise _invalid_json(f) from exc
            except StopIteration as exc:
                raise CorruptExport("export file ends before its JSON is complete") from exc
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return SplitResult(
        profiles=profiles,
        has_definitions=definitions is not None,
        requested_found=any(p.role == "requested" for p in profiles),
        attribute_names=definitions.attributes if definitions else {},
    )


def sha256_file(path: Path) -> tuple[str, int]:
    """Return the hex SHA-256 and the size in bytes of ``path``, reading it in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _read_definitions(source: Path) -> _Definitions | None:
    """First pass: read ``metadata`` (small) so names can be joined while splitting."""
    with source.open("rb") as f:
        try:
            found = next(
                iter(ijson.items(f, "metadata", use_float=False, buf_size=READ_CHUNK_BYTES)),
                None,
            )
        except (ijson.JSONError, UnicodeError) as exc:
            raise _invalid_json(f) from exc
    if found is None:
        return None
    definitions = _Definitions(attributes={}, events={})
    sections = found.get("sections") if isinstance(found, dict) else None
    if not isinstance(sections, dict):
        return definitions
    for section_disc, section in sections.items():
        if not isinstance(section, dict):
            continue
        _collect_names(section.get("attributes"), str(section_disc), definitions.attributes)
        _collect_names(section.get("events"), str(section_disc), definitions.events)
    return definitions


def _invalid_json(f: IO[bytes]) -> CorruptExport:
    # ijson's own message quotes the text around the error: it may be personal data.
    return CorruptExport(
        f"export file is not valid JSON (truncated or garbled) near byte {f.tell()}"
    )


def _collect_names(found: object, section_disc: str, names: dict[tuple[str, str], str]) -> None:
    """Accept definitions keyed by discriminator or as a list of definition objects."""
    if isinstance(found, dict):
        items: list[tuple[object, object]] = list(found.items())
    elif isinstance(found, list):
        items = [(None, d) for d in found]
    else:
        return
    for key, definition in items:
        if not isinstance(definition, dict):
            continue
        disc = definition.get("discriminator", key)
        name = definition.get("name")
        if isinstance(disc, str) and isinstance(name, str):
            names[(section_disc, disc)] = name


def _scalar_text(event: str, value: Any) -> str:
    if event == "string":
        return encode_basestring(value)
    if event == "null":
        return "null"
    if event == "boolean":
        return "true" if value else "false"
    # "number"/"integer"/"double": int or Decimal (use_float=False), so str() is exact.
    return str(value)


class _Splitter:
    """Recursive descent over ijson events; one method per level of the export file."""

    def __init__(
        self,
        events: Iterator[_Event],
        profiles_dir: Path,
        requested_key: str,
        definitions: _Definitions | None,
        written: list[Path],
    ) -> None:
        self._events = events
        self._profiles_dir = profiles_dir
        self._requested_key = requested_key
        self._definitions = definitions
        self._written = written
        self._profiles: list[ProfileDocument] = []

    def run(self) -> list[ProfileDocument]:
        event, _ = next(self._events)
        if event != "start_map":
            raise CorruptExport("export file is not a JSON object")
        saw_profiles = False
        for key in self._keys():
            event, _ = next(self._events)
            if key == "profiles" and not saw_profiles:
                if event != "start_map":
                    raise CorruptExport("export file's 'profiles' is not an object")
                saw_profiles = True
                self._split_profiles()
            else:
                self._skip(event)
        # Drain the parser so trailing garbage after the top-level object is caught.
        for _ in self._events:
            pass
        if not saw_profiles:
            raise CorruptExport("export file has no 'profiles' object")
        return self._profiles

    def _keys(self) -> Iterator[str]:
        """Yield the keys of the map just opened, leaving each value to the caller."""
        for event, value in self._events:
            if event == "end_map":
                return
            yield value
        raise CorruptExport("export file ends inside an object")

    def _skip(self, event: str) -> None:
        if event not in ("start_map", "start_array"):
            return
        depth = 1
        for inner, _ in self._events:
            if inner in ("start_map", "start_array"):
                depth += 1
            elif inner in ("end_map", "end_array"):
                depth -= 1
                if depth == 0:
                    return

    def _copy(self, first_event: str, first_value: Any, out: _DocumentWriter) -> None:
        """Re-emit one complete value (its first event already read) verbatim."""
        if first_event not in ("start_map", "start_array"):
            out.write(_scalar_text(first_event, first_value))
            return
        write = out.write
        encode = encode_basestring
        write("{" if first_event == "start_map" else "[")
        depth = 1
        sep = ""
        # The hot loop: one iteration per parse event inside event data and values.
        for event, value in self._events:
            if event == "map_key":
                write(sep + encode(value) + ":")
                sep = ""
            elif event == "string":
                write(sep + encode(value))
                sep = ","
            elif event == "number":
                write(sep + str(value))
                sep = ","
            elif event == "start_map":
                write(sep + "{")
                sep = ""
                depth += 1
            elif event == "end_map":
                write("}")
                sep = ","
                depth -= 1
                if depth == 0:
                    return
            elif event == "start_array":
                write(sep + "[")
                sep = ""
                depth += 1
            elif event == "end_array":
                write("]")
                sep = ","
                depth -= 1
                if depth == 0:
                    return
            else:
                write(sep + _scalar_text(event, value))
                sep = ","

    def _split_profiles(self) -> None:
        for export_key in self._keys():
            event, _ = next(self._events)
            if event != "start_map":
                raise CorruptExport(f"profile #{len(self._profiles)} is not an object")
            self._profiles.append(self._write_profile(export_key, len(self._profiles)))

    def _write_profile(self, export_key: str, index: int) -> ProfileDocument:
        role: Role = "requested" if export_key == self._requested_key else "merged"
        path = self._profiles_dir / f"{index}.json"
        self._written.append(path)
        sections: dict[str, _SectionTally] = {}
        with path.open("wb") as f:
            out = _DocumentWriter(f)
            out.write('{"export_key":' + encode_basestring(export_key) + ',"role":"' + role + '"')
            saw_sections = False
            for key in self._keys():
                event, value = next(self._events)
                if key in _RESERVED_KEYS:
                    self._skip(event)
                    continue
                out.write("," + encode_basestring(key) + ":")
                if key == "sections" and not saw_sections:
                    if event != "start_map":
                        raise CorruptExport(
                            f"profile #{index} has 'sections' that is not an object"
                        )
                    saw_sections = True
                    self._write_sections(out, sections)
                else:
                    self._copy(event, value, out)
            if not saw_sections:
                out.write(',"sections":{}')
            out.write("}")
            sha256 = out.hexdigest()
        per_section = {
            disc: Counts(sections=1, attributes=t.attributes, history=t.history, events=t.events)
            for disc, t in sections.items()
        }
        total = Counts(
            sections=len(per_section),
            attributes=sum(c.attributes for c in per_section.values()),
            history=sum(c.history for c in per_section.values()),
            events=sum(c.events for c in per_section.values()),
        )
        return ProfileDocument(
            export_key=export_key,
            index=index,
            role=role,
            path=path,
            bytes=out.bytes,
            sha256=sha256,
            counts=total,
            sections=per_section,
        )

    def _write_sections(self, out: _DocumentWriter, sections: dict[str, _SectionTally]) -> None:
        out.write("{")
        for n, section_disc in enumerate(self._keys()):
            out.write(("," if n else "") + encode_basestring(section_disc) + ":")
            # A repeated section key adds to the same tally.
            tally = sections.setdefault(section_disc, _SectionTally())
            event, value = next(self._events)
            if event != "start_map":
                self._copy(event, value, out)  # tolerated: not the documented shape
                continue
            out.write("{")
            for m, key in enumerate(self._keys()):
                out.write(("," if m else "") + encode_basestring(key) + ":")
                event, value = next(self._events)
                if key == "attributes" and event == "start_map":
                    self._write_attributes(out, section_disc, tally)
                elif key == "events" and event == "start_array":
                    self._write_events(out, section_disc, tally)
                else:
                    self._copy(event, value, out)
            out.write("}")
        out.write("}")

    def _write_attributes(
        self, out: _DocumentWriter, section_disc: str, tally: _SectionTally
    ) -> None:
        names = self._definitions.attributes if self._definitions else {}
        out.write("{")
        for n, attribute_disc in enumerate(self._keys()):
            out.write(("," if n else "") + encode_basestring(attribute_disc) + ":")
            tally.attributes += 1
            event, value = next(self._events)
            if event == "start_map":
                self._write_named_object(out, names, section_disc, attribute_disc, tally)
            else:
                self._copy(event, value, out)  # a bare value: nothing to attach a name to
            out.maybe_flush()
        out.write("}")

    def _write_events(self, out: _DocumentWriter, section_disc: str, tally: _SectionTally) -> None:
        names = self._definitions.events if self._definitions else {}
        out.write("[")
        count = 0
        for event, value in self._events:
            if event == "end_array":
                break
            if count:
                out.write(",")
            count += 1
            if event == "start_map":
                self._write_named_object(out, names, section_disc, None, tally)
            else:
                self._copy(event, value, out)
            out.maybe_flush()
        out.write("]")
        tally.events += count

    def _write_named_object(
        self,
        out: _DocumentWriter,
        names: dict[tuple[str, str], str],
        section_disc: str,
        attribute_disc: str | None,
        tally: _SectionTally,
    ) -> None:
        """Copy an attribute object (``attribute_disc`` given) or an event object, then
        append its ``"name"`` from the definitions unless it has one already."""
        disc = attribute_disc
        out.write("{")
        count = 0
        has_name = False
        for key in self._keys():
            out.write(("," if count else "") + encode_basestring(key) + ":")
            count += 1
            has_name = has_name or key == "name"
            event, value = next(self._events)
            if attribute_disc is not None and key == "history" and event == "start_array":
                tally.history += self._copy_items(out)
                continue
            if attribute_disc is None and key == "discriminator" and event == "string":
                disc = value
            self._copy(event, value, out)
        name = names.get((section_disc, disc)) if disc is not None else None
        if name is not None and not has_name:
            out.write(("," if count else "") + '"name":' + encode_basestring(name))
        out.write("}")

    def _copy_items(self, out: _DocumentWriter) -> int:
        """Copy the rest of an array just opened; return how many items it held."""
        out.write("[")
        count = 0
        for event, value in self._events:
            if event == "end_array":
                break
            if count:
                out.write(",")
            count += 1
            self._copy(event, value, out)
        out.write("]")
        return count
