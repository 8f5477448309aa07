"""Strict reading of the project's CSV inputs (reports CSVs, ``predictions.csv``), with line numbers.

Python's ``csv`` module is lenient: an unterminated quote swallows the following rows into one field,
a row with an unquoted comma gets extra fields, and a field longer than 131,072 characters stops the
reader with an error. `read_csv` reads a whole file and returns its records with the line each starts
on, and, separately, every malformed record as a `CsvProblem` (its lines and what is wrong) — never
merged into its neighbours. What to do with the problems (skip the rows with a warning, or refuse the
file) is the caller's choice, and it says which.

Malformed records:

* quoting the csv module rejects in strict mode (text after a closing quote, a quote in an unquoted field);
* a quoted field still open at the end of the file;
* a quoted field that spans lines where a following line looks like a row of its own (``looks_like_row``):
  an unterminated quote, whose rows would otherwise be merged;
* a record with more or fewer fields than the header.

A file that ends inside a record (a writer killed mid-row) has a ``torn`` last record: `CsvRows.torn`
says where, and `repair_torn_tail` cuts it off (or adds a missing line end) before a resumable writer
appends to the file.
"""

from __future__ import annotations

import contextlib
import csv
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence


class CsvFormatError(ValueError):
    """The file cannot be read as a CSV table at all; ``str()`` names the file and the problem."""


@dataclass(frozen=True)
class CsvProblem:
    """A malformed record: the physical lines it spans (1-based, header = line 1) and what is wrong."""

    first_line: int
    last_line: int
    problem: str

    def __str__(self) -> str:
        where = f"line {self.first_line}" if self.last_line == self.first_line else \
            f"lines {self.first_line}-{self.last_line}"
        return f"{where}: {self.problem}"


@dataclass
class CsvRows:
    """The well-formed records of a CSV file (each with the line it starts on) and its problems."""

    path: Path
    header: list[str]
    rows: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    problems: list[CsvProblem] = field(default_factory=list)     # malformed records (the torn one apart)
    torn: CsvProblem | None = None      # the last record, cut off by the end of the file
    torn_at: int | None = None          # byte offset where that record begins
    ends_with_newline: bool = True

    @property
    def all_problems(self) -> list[CsvProblem]:
        """Every malformed record, the torn last one included (for readers that do not repair)."""
        return self.problems + ([self.torn] if self.torn is not None else [])

    def describe_problems(self, problems: Sequence[CsvProblem] | None = None, limit: int = 10) -> str:
        """``line 7: …; lines 12-14: …`` (at most ``limit``, then a count); default: `all_problems`."""
        problems = self.all_problems if problems is None else list(problems)
        shown = "; ".join(str(p) for p in problems[:limit])
        more = len(problems) - limit
        return shown + (f"; … and {more} more" if more > 0 else "")


@contextlib.contextmanager
def field_size_limit(limit: int) -> Iterator[None]:
    """Raise the csv module's per-field limit (131,072 characters by default, process-wide) to at least
    ``limit`` for the duration, then restore it. Bounded by what a C long holds on every platform."""
    old = csv.field_size_limit()
    csv.field_size_limit(max(old, min(int(limit), 2**31 - 1, sys.maxsize)))
    try:
        yield
    finally:
        csv.field_size_limit(old)


def decode_utf8(path: Path, data: bytes) -> str:
    """The bytes as text (a UTF-8 byte-order mark is dropped); not UTF-8 -> `CsvFormatError` with the line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise CsvFormatError(f"{path}: not UTF-8 text (line {line} has the byte 0x{data[err.start]:02x}); "
                             "save it as UTF-8 (in a spreadsheet: CSV UTF-8)") from None


def read_csv(path: str | os.PathLike, required: Sequence[str] = (),
             looks_like_row: Callable[[str], bool] | None = None) -> CsvRows:
    """Read ``path`` strictly (see the module docstring). ``required`` columns must be in the header;
    ``looks_like_row(line)`` tells whether a physical line inside a quoted field is really the start
    of a new row (default: it splits into as many fields as the header and its first field is a
    plausible key: not empty, no spaces). Raises `CsvFormatError` for a missing or empty file, one
    that is not UTF-8, or a header without the required columns."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CsvFormatError(f"{path}: file not found") from None
    except OSError as err:
        raise CsvFormatError(f"{path}: cannot be read ({err.strerror or err})") from None
    text = decode_utf8(path, data)
    if not text.strip():
        raise CsvFormatError(f"{path}: the file is empty")
    lines = text.splitlines(keepends=True)
    offsets = [0]                                        # byte offset where each physical line starts
    bom = len(data) - len(data.lstrip(b"\xef\xbb\xbf")) if data.startswith(b"\xef\xbb\xbf") else 0
    offsets[0] = bom
    for line in lines:
        offsets.append(offsets[-1] + len(line.encode("utf-8")))

    with field_size_limit(len(text) + 1):               # no field can be longer than the file
        reader = csv.reader(iter(lines), strict=True)
        try:
            header = next(reader)
        except csv.Error as err:
            raise CsvFormatError(f"{path}: line 1: the header is not valid CSV ({err})") from None
        header = [h.strip() for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            raise CsvFormatError(f"{path}: missing column(s) {', '.join(missing)} (the header has {', '.join(header)})")
        out = CsvRows(path, header, ends_with_newline=text.endswith(("\n", "\r")))
        n = len(header)
        if looks_like_row is None:
            def looks_like_row(line: str) -> bool:
                try:
                    fields = next(csv.reader([line], strict=True))
                except (csv.Error, StopIteration):
                    return False
                return len(fields) == n and bool(fields[0].strip()) and " " not in fields[0].strip()

        base = 0                                          # lines before the current reader's first line
        while True:
            first = base + reader.line_num + 1
            try:
                record = next(reader)
                error = None
            except StopIteration:
                break
            except csv.Error as err:
                record, error = None, err
            last = max(base + reader.line_num, first)
            # an unterminated quote: a line inside the "field" is a row of its own -> report the lines
            # before it and read on from it, so no row is merged into another
            inner = next((k for k in range(first + 1, last + 1) if looks_like_row(lines[k - 1].rstrip("\r\n"))),
                         None) if last > first else None
            if inner is not None:
                out.problems.append(CsvProblem(first, inner - 1, f"a quote opened on line {first} is not closed "
                                                                 f"(line {inner} starts a new row)"))
                base = inner - 1
                reader = csv.reader(iter(lines[base:]), strict=True)
                continue
            if error is not None:
                if "unexpected end of data" in str(error):
                    out.torn_at = offsets[first - 1]
                    out.torn = CsvProblem(first, last, "the file ends inside this row (a quote is never closed; "
                                                       "cut off by an interruption?)")
                    break
                out.problems.append(CsvProblem(first, last, f"malformed quoting ({error})"))
                continue
            if not record or (len(record) == 1 and not record[0].strip()):
                continue                                  # a blank line
            if len(record) != n:
                kind = "more" if len(record) > n else "fewer"
                hint = " (an unquoted comma in a text?)" if len(record) > n else ""
                problem = CsvProblem(first, last, f"{len(record)} fields, {kind} than the header's {n}{hint}")
                if last == len(lines) and not out.ends_with_newline and len(record) < n:
                    out.torn, out.torn_at = problem, offsets[first - 1]     # a last row cut short
                else:
                    out.problems.append(problem)
                continue
            out.rows.append((first, dict(zip(header, record))))
    return out


def repair_torn_tail(table: CsvRows) -> str | None:
    """Make ``table.path`` safe to append to: cut off a torn last record, or end an unterminated last
    line. Returns what was done, in words (None when nothing was needed)."""
    if table.torn is not None and table.torn_at is not None:
        with open(table.path, "r+b") as f:
            f.truncate(table.torn_at)
            f.flush()
            os.fsync(f.fileno())
        return f"{table.path}: {table.torn}; removed it before appending"
    if not table.ends_with_newline:
        with open(table.path, "ab") as f:
            f.write(b"\r\n")                # csv.writer's line end
            f.flush()
            os.fsync(f.fileno())
        return None
    return None
