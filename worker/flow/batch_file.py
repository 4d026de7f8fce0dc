"""Reading a batch file: one export key a line, or a CSV with an ``export_key`` column."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from worker.errors import BatchFileError, InvalidExportKey
from worker.model.ids import validate_export_key

#: Largest batch file read, in bytes (50,000 e-mail-sized keys are ~2 MB).
MAX_BATCH_FILE_BYTES = 64 * 1024 * 1024
#: Bad lines listed in an error message before "and N more".
MAX_REPORTED = 10


@dataclass(frozen=True)
class BatchItem:
    export_key: str
    reference: str | None = None


@dataclass
class BatchFile:
    """What a batch file holds: the items to export, duplicates dropped, bad lines found."""

    items: list[BatchItem] = field(default_factory=list)
    #: (line number, reason) for every line that is not a valid export key. No key in it.
    bad_lines: list[tuple[int, str]] = field(default_factory=list)
    duplicates: int = 0

    def describe_bad_lines(self) -> str:
        shown = [f"line {n}: {why}" for n, why in self.bad_lines[:MAX_REPORTED]]
        more = len(self.bad_lines) - MAX_REPORTED
        return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


def read_batch_file(path: Path) -> BatchFile:
    """Parse ``path``; raise BatchFileError if it cannot be read at all."""
    try:
        if path.stat().st_size > MAX_BATCH_FILE_BYTES:
            raise BatchFileError(f"{path} is larger than {MAX_BATCH_FILE_BYTES} bytes")
        raw = path.read_bytes()
    except OSError as exc:
        raise BatchFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise BatchFileError(f"{path} is not UTF-8 text (line {line})") from None
    return parse_batch_text(text)


def parse_batch_text(text: str) -> BatchFile:
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    header = [cell.strip().lower() for cell in next(csv.reader([first]), [])]
    result = BatchFile()
    seen: set[str] = set()
    if "export_key" in header:
        rows = csv.reader(io.StringIO(text))
        columns = [cell.strip().lower() for cell in next(rows)]
        key_at = columns.index("export_key")
        ref_at = columns.index("reference") if "reference" in columns else None
        for number, row in enumerate(rows, start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= key_at:
                result.bad_lines.append((number, "no export_key value"))
                continue
            reference = (
                row[ref_at].strip() or None if ref_at is not None and ref_at < len(row) else None
            )
            _add(result, seen, number, row[key_at].strip(), reference)
    else:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                _add(result, seen, number, line.strip(), None)
    return result


def _add(result: BatchFile, seen: set[str], number: int, key: str, reference: str | None) -> None:
    try:
        validate_export_key(key)
    except InvalidExportKey as exc:
        result.bad_lines.append((number, str(exc)))
        return
    if key in seen:
        result.duplicates += 1
        return
    seen.add(key)
    result.items.append(BatchItem(key, reference))
