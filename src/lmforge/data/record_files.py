"""Instruction and preference record files read into canonical records, with a report of every skip.

A file is JSON lines (``.jsonl``, ``.ndjson``) or JSON (``.json``: an array of records, one record,
or JSON lines under a ``.json`` name); a ``datasets`` split gives its rows the same way. Each item
comes with where it is (``FILE:LINE`` for files, ``URI#ROW`` for dataset rows). :func:`read_file`
detects the file's format from its first records (or takes the configured one), normalizes every
record (:mod:`lmforge.data.chat_formats`, :mod:`lmforge.data.preference_formats`) and counts every
record it skips in a :class:`FileReport`, by reason, with the first examples and their places: a bad
record is never fatal to the others. A file left with no usable record is a DataError
(:func:`require_records`) naming the file, the main reasons and the fix. :class:`RecordSet` joins
the files of every source and skips a record whose id was already taken.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from lmforge.core.errors import DataError
from lmforge.data.chat_formats import DETECT_RECORDS, SFT_READERS, RecordProblem, detect_format
from lmforge.data.preference_formats import from_preference

MAX_EXAMPLES = 20  # skipped records listed with their place, per file; the rest are counted
Item = tuple[str, Any]  # (where, the parsed record or the RecordProblem that stopped it)
FORMATS_FIX = "openai, sharegpt, alpaca, prompt_completion or preference"


@dataclass
class FileReport:
    """What reading one file gave: records read and skipped, why, and where the first skips were."""

    file: str
    format: str | None = None
    read: int = 0
    skipped: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, str]] = field(default_factory=list)

    def skip(self, where: str, problem: RecordProblem) -> None:
        self.skipped += 1
        self.reasons[problem.reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"where": where, "reason": problem.reason, "detail": problem.detail[:300]})

    def as_dict(self) -> dict:
        return {"file": self.file, "format": self.format, "read": self.read, "skipped": self.skipped,
                "reasons": dict(sorted(self.reasons.items())), "examples": self.examples}


def jsonl_items(lines: Iterable[bytes], uri: str) -> Iterator[Item]:
    """The records of JSON lines, each with ``uri:LINE``; a bad line is a RecordProblem in its place."""
    for number, raw in enumerate(lines, start=1):
        where = f"{uri}:{number}"
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
        except UnicodeDecodeError as exc:
            yield where, RecordProblem("not_utf8", f"line {number} is not UTF-8 ({exc.reason})")
            continue
        if not line:
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as exc:
            yield where, RecordProblem("malformed_json", f"line {number} is not JSON: {exc.msg} (column {exc.colno})")


def json_items(data: bytes, uri: str) -> Iterator[Item]:
    """The records of a .json file: an array's elements (each with the line it starts on), one object,
    or JSON lines. A syntax error inside an array ends the file there (JSON cannot be resynchronized)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        yield uri, RecordProblem("not_utf8", f"the file is not UTF-8 ({exc.reason})")
        return
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] != "[":
        try:
            yield f"{uri}:{text.count(chr(10), 0, start) + 1}", json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data":  # several objects: JSON lines under a .json name
                yield from jsonl_items(data.splitlines(), uri)
            else:
                yield f"{uri}:{exc.lineno}", RecordProblem("malformed_json", f"line {exc.lineno}: {exc.msg}")
        return
    yield from _array_items(text, start + 1, uri)


def _array_items(text: str, pos: int, uri: str) -> Iterator[Item]:
    decoder = json.JSONDecoder()
    line, counted = 1, 0

    def where(at: int) -> str:
        nonlocal line, counted
        line += text.count("\n", counted, at)
        counted = at
        return f"{uri}:{line}"

    def skip_space(at: int) -> int:
        while at < len(text) and text[at] in " \t\r\n":
            at += 1
        return at

    pos = skip_space(pos)
    if text[pos:pos + 1] == "]":
        return
    while pos < len(text):
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            yield where(exc.pos), RecordProblem("malformed_json", f"{exc.msg}; the rest of the array is not read")
            return
        yield where(pos), record
        pos = skip_space(end)
        if text[pos:pos + 1] == "]":
            return
        if text[pos:pos + 1] != ",":
            yield where(pos), RecordProblem("malformed_json", "expected ',' or ']' between records; "
                                            "the rest of the array is not read")
            return
        pos = skip_space(pos + 1)


def read_file(items: Iterable[Item], fmt: str, kind: str, report: FileReport) -> list[tuple[str, dict]]:
    """The canonical records of one file's items, with where each came from; skips counted in ``report``.

    ``fmt`` is the configured format (``auto`` detects it from the first records); ``kind`` is
    ``sft`` or ``preference``, the set the file was listed under.
    """
    stream = iter(items)
    if fmt == "auto":
        head = list(_first_objects(stream))
        stream = chain(head, stream)
        fmt = detect_format(record for _, record in head) or "auto"
        _check_kind(fmt, kind, report.file)
    report.format = None if fmt == "auto" else fmt
    reader = from_preference if fmt == "preference" else SFT_READERS.get(fmt)
    records = []
    for where, record in stream:
        try:
            if isinstance(record, RecordProblem):
                raise record
            if not isinstance(record, dict):
                raise RecordProblem("not_an_object", f"a {type(record).__name__}, not a JSON object")
            if reader is None:
                raise RecordProblem("unknown_format", f"keys {sorted(record)[:8]} match no known format")
            records.append((where, reader(record)))
        except RecordProblem as problem:
            report.skip(where, problem)
    return records


def _first_objects(stream: Iterator[Item]) -> Iterator[Item]:
    """Items up to and including the DETECT_RECORDS-th object (what detection looks at)."""
    objects = 0
    for item in stream:
        yield item
        objects += isinstance(item[1], dict)
        if objects >= DETECT_RECORDS:
            return


def _check_kind(fmt: str, kind: str, file: str) -> None:
    if kind == "sft" and fmt == "preference":
        raise DataError(f"{file} holds preference records (prompt/chosen/rejected), listed as instructions",
                        "list it under data.preferences.sources, or set `format:` on its source")
    if kind == "preference" and fmt not in ("preference", "auto"):
        raise DataError(f"{file} holds {fmt} SFT records, listed as preferences",
                        "list it under data.instructions.sources, or set `format: preference` on its source")


def require_records(report: FileReport) -> None:
    """Raise the DataError for a file that gave no usable record (naming it, why, and the fix)."""
    if report.read:
        return
    if not report.skipped:
        raise DataError(f"{report.file} holds no records", "fill it with JSON records, or remove it from the source")
    reasons = ", ".join(f"{n} {reason}" for reason, n in report.reasons.most_common(3))
    first = report.examples[0]
    cause = f"{report.file} has no usable record ({reasons}; first at {first['where']}: {first['detail']})"
    if report.format is None:
        raise DataError(cause, f"set `format:` on its source ({FORMATS_FIX}) or convert the file to one of them")
    raise DataError(cause, f"fix the records (the collect report lists where), or set the right `format:` "
                    f"({FORMATS_FIX}) on its source")


class RecordSet:
    """Canonical records of every file of one set, first id wins; a repeated id is skipped and counted."""

    def __init__(self) -> None:
        self.records: dict[str, dict] = {}
        self.places: dict[str, str] = {}

    def add(self, records: list[tuple[str, dict]], report: FileReport) -> None:
        for where, record in records:
            first = self.places.get(record["id"])
            if first is None:
                self.records[record["id"]], self.places[record["id"]] = record, where
                report.read += 1
            elif self.records[record["id"]] == record:
                report.skip(where, RecordProblem("duplicate", f"the same record as {first}"))
            else:
                report.skip(where, RecordProblem("duplicate_id", f"id {record['id']!r} is already used by {first}; "
                                                 "give records unique ids or drop the `id` field"))

