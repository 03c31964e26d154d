"""Bytes to text for every format: binary detection, encoding fallback, mojibake repair.

Real corpora hold files with a text extension that are not text (an image renamed ``.txt``), files
in legacy encodings, and text that was decoded with the wrong codec once already ("cafÃ©"). Each
case is decided here once: binary input is refused (the caller counts it as skipped), invalid UTF-8
is decoded with the detected encoding, and mojibake is repaired with ftfy; every repair is counted
in the source's tally so the summary says how much text was touched.
"""

from __future__ import annotations

import codecs
import re

from lmforge.collection.types import Tally

_SNIFF_BYTES = 8192
# Magic numbers of binary formats that turn up under text extensions.
_BINARY_MAGIC = (b"\x89PNG", b"GIF87a", b"GIF89a", b"\xff\xd8\xff", b"%PDF-", b"PK\x03\x04", b"\x7fELF",
                 b"\x1f\x8b", b"(\xb5/\xfd", b"\xfd7zXZ", b"PAR1")
_CONTROL_BYTES = bytes(sorted(set(range(32)) - {8, 9, 10, 12, 13, 27}))
# A UTF-8 lead byte read as Latin-1/cp1252 followed by a continuation byte read the same way: the
# signature of mojibake. ftfy is slow (~1 s/MB), so it only runs on text that shows this pattern.
_SUSPECT = re.compile(
    "[\u00c2-\u00ef][\u0080-\u00bf\u20ac\u201a\u0192\u201e\u2026\u2020\u2021\u02c6\u2030\u0160"
    "\u2039\u0152\u017d\u2018\u2019\u201c\u201d\u2022\u2013\u2014\u02dc\u2122\u0161\u203a\u0153\u017e\u0178]"
)


def looks_binary(data: bytes) -> bool:
    """True for data that is not text in any encoding we decode (UTF-16 with a BOM is text)."""
    head = data[:_SNIFF_BYTES]
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return False
    if head.startswith(_BINARY_MAGIC) or b"\x00" in head:
        return True
    if not head:
        return False
    controls = len(head) - len(head.translate(None, _CONTROL_BYTES))
    return controls / len(head) > 0.05


def decode_text(data: bytes, tally: Tally, where: str) -> str | None:
    """Decode a whole file or member; None (counted as skipped ``binary``) when it is not text."""
    if looks_binary(data):
        tally.skip("binary", where, "binary content under a text format")
        return None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return repair_mojibake(data.decode("utf-16", errors="replace"), tally)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = _decode_fallback(data)
        tally.repair("invalid_utf8")
    return repair_mojibake(text, tally)


def decode_line(raw: bytes, tally: Tally) -> str:
    """Decode one line of a record file (JSONL, CSV); invalid bytes are replaced and counted."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        tally.repair("invalid_utf8")
    return repair_mojibake(text, tally) if _SUSPECT.search(text) else text


def repair_mojibake(text: str, tally: Tally) -> str:
    if not _SUSPECT.search(text):
        return text
    import ftfy

    fixed = ftfy.fix_encoding(text)
    if fixed != text:
        tally.repair("mojibake")
    return fixed


def _decode_fallback(data: bytes) -> str:
    """Decode non-UTF-8 bytes with the encoding charset-normalizer detects, preferring cp1252.

    On short texts the detector often ranks a sibling code page (Baltic, Central European) first
    for plain Western text; cp1252 is by far the most common legacy encoding, so it wins whenever
    the detector finds it plausible at all. Text it does not fit (Polish, Cyrillic) keeps the pick.
    """
    from charset_normalizer import from_bytes

    matches = from_bytes(data[:262_144])
    encodings = [match.encoding for match in matches]
    encoding = "cp1252" if "cp1252" in encodings or not encodings else encodings[0]
    try:
        return data.decode(encoding, errors="replace")
    except LookupError:
        return data.decode("cp1252", errors="replace")
