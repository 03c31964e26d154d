"""Property-based tests of every document reader of the collect stage (issue 20): random and adversarial
bytes under every file name the readers know never raise (a bad file is a counted skip with a reason),
never yield an empty or misfiled document, and never write a file anywhere.

The readers run on bytes in memory (:func:`documents_from_bytes`, the path the local, S3 and archive
readers share), with the working directory and the temporary directory pointed at empty folders
that must stay empty. Each property is bounded to a few seconds.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.collection.feed import parse_feed
from lmforge.collection.formats import FORMATS, FormatOptions, documents_from_bytes
from lmforge.collection.html import main_text, parse_page
from lmforge.collection.instructions import read_record_sources
from lmforge.collection.types import Tally
from lmforge.config.instructions import LocalRecords
from lmforge.core.errors import DataError

BOUNDED = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])
NAMES = [*sorted(f"file{suffix}" for suffix in FORMATS),
         "file.txt.gz", "file.jsonl.zst", "file.csv.bz2", "file.json.xz", "file.zip", "file.tar", "file.tar.gz"]
OPTS = FormatOptions("local", max_bytes=2**20, max_document_bytes=64 * 2**10)
URI = "file:///corpus/input"

# Pieces of the formats the readers parse, so random files look like broken real ones.
TOKENS = [b"[", b"]", b"{", b"}", b'"text": ', b'"', b",", b":", b"\n", b"\r\n", b"\t", b"\x00", b"\xff\xfe", b"\xc3",
          b"<html>", b"<p>", b"</p>", b"<div>", b"<!--", b"<![CDATA[", b"&#x0;", b"&amp;", b"<?xml ", b"<rss>", b"<item>",
          b"%PDF-1.4\n", b"obj <<", b">> stream\n", b"endstream", b"PK\x03\x04", b"PAR1", b"\x1f\x8b", b"# Title\n",
          b"text,title\n", b'"a ""b"" c",', b"caf\xc3\x83\xc2\xa9 ", b"word ", b"\xed\xa0\x80", b"\\ud800"]
structured = st.lists(st.sampled_from(TOKENS), max_size=200).map(b"".join)
nested = st.tuples(st.sampled_from([b"[", b"{\"a\":", b"<div>", b"<a>"]), st.integers(1, 200_000)).map(
    lambda pair: pair[0] * pair[1])
hostile = st.one_of(st.binary(max_size=4096), structured, nested)


@pytest.fixture
def sealed(tmp_path) -> Iterator[Path]:
    """The working and temporary directories set to empty folders for the test's duration."""
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    before, saved = Path.cwd(), tempfile.tempdir
    os.chdir(cwd)
    tempfile.tempdir = str(tmp)
    try:
        yield tmp_path
    finally:
        os.chdir(before)
        tempfile.tempdir = saved


def _nothing_written(root: Path) -> bool:
    return not any((root / "cwd").iterdir()) and not any((root / "tmp").iterdir())


def _read(name: str, data: bytes) -> tuple[list[dict], Tally]:
    tally = Tally()
    return list(documents_from_bytes(name, data, URI, OPTS, tally)), tally


def _well_formed(docs: list[dict], tally: Tally) -> None:
    for doc in docs:
        assert isinstance(doc["text"], str) and doc["text"].strip()
        assert doc["uri"].startswith(URI)
        json.loads(doc["meta"])
    for example in tally.examples:
        assert example["reason"] and example["where"].startswith(URI)


@pytest.mark.parametrize("name", NAMES)
@BOUNDED
@given(data=hostile)
def test_every_reader_survives_hostile_bytes(sealed, name, data):
    docs, tally = _read(name, data)
    _well_formed(docs, tally)
    assert _nothing_written(sealed)


@BOUNDED
@given(texts=st.lists(st.text(min_size=1, max_size=200).filter(str.strip), min_size=1, max_size=5),
       junk=st.lists(hostile, max_size=3))
def test_good_records_survive_bad_neighbours_in_jsonl(sealed, texts, junk):
    lines = [json.dumps({"text": t}).encode() for t in texts] + [j.replace(b"\n", b" ") for j in junk]
    docs, tally = _read("records.jsonl", b"\n".join(lines) + b"\n")
    _well_formed(docs, tally)
    assert len(docs) >= len(texts)  # every good line is a document; junk is only ever skipped (or valid)


def _zip(members: list[tuple[str, bytes, bool]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data, link in members:
            info = zipfile.ZipInfo(name)
            if link:
                info.external_attr = 0o120777 << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def _tar(members: list[tuple[str, bytes, bool]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if link:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            else:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if not link else None)
    return buffer.getvalue()


member_names = st.one_of(
    st.sampled_from(["../evil.txt", "/abs/evil.txt", "a/../../evil.txt", "C:/evil.txt", "..\\evil.txt", "ok.txt",
                     "dir/ok.md", "inner.zip", "x.jsonl.gz"]),
    st.text(alphabet="abc./\\:", min_size=1, max_size=20).map(lambda s: s + ".txt"))
members = st.lists(st.tuples(member_names, hostile, st.booleans()), min_size=1, max_size=5)


@pytest.mark.filterwarnings("ignore:Duplicate name")
@BOUNDED
@given(entries=members, kind=st.sampled_from(["zip", "tar", "tar.gz"]))
def test_archive_members_never_escape(sealed, entries, kind):
    data = _zip(entries) if kind == "zip" else _tar(entries)
    if kind == "tar.gz":
        data = gzip.compress(data)
    docs, tally = _read(f"bundle.{kind}", data)
    _well_formed(docs, tally)
    for doc in docs:
        member = doc["uri"].split("!/", 1)[1]
        assert not member.startswith("/") and ".." not in member.split("/")  # stays under the extraction root
    assert _nothing_written(sealed)


@BOUNDED
@given(data=st.one_of(hostile, structured.map(lambda b: b"<rss><channel><item>" + b + b"</item></channel></rss>")))
def test_feed_parser_raises_only_what_its_caller_counts(data):
    try:
        entries = parse_feed(data)
    except ElementTree.ParseError:
        return  # counted as feed_unreadable by the feed source
    assert all(isinstance(e.content, str) for e in entries)


@BOUNDED
@given(data=hostile)
def test_html_readers_never_raise(data):
    text = data.decode("utf-8", errors="replace")
    info = parse_page(text)
    title, body = main_text(text, "http://example.org/", info)
    assert isinstance(title, str) and isinstance(body, str)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=hostile, name=st.sampled_from(["chats.jsonl", "chats.json", "chats.jsonl.gz"]))
def test_instruction_files_are_read_or_refused_with_a_data_error(tmp_path, data, name):
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    (folder / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    try:
        records, reports = read_record_sources([LocalRecords(paths=[str(folder)])], "sft", tmp_path / "scratch")
    except DataError as exc:
        assert exc.cause and exc.fix
        return
    assert records and reports
