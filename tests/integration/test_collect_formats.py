"""Local files of every format, compressed and archived, with bad inputs: real files, real parsers."""

from __future__ import annotations

import gzip
import json
import os

import pyarrow.parquet as pq
import pytest
from fixtures.collect.corpus import EXPECTED, EXPECTED_SKIPS, LONG, build_corpus, markers

from lmforge.collection.textdecode import decode_text
from lmforge.collection.types import Tally
from lmforge.config.data import DataConfig, InstructionConfig, LocalSource, ParallelConfig
from lmforge.core.workspace import Workspace
from lmforge.stages.collect import collect, raw_shard_paths, read_raw_documents


def _config(*sources, **extra) -> DataConfig:
    return DataConfig(sources=list(sources), instructions=InstructionConfig(source="none"), progress_interval_s=0,
                      **extra)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("formats") / "corpus")


def test_every_format_yields_exactly_its_documents(corpus, tmp_path):
    ws = Workspace(tmp_path / "home")
    result = collect(_config(LocalSource(paths=[str(corpus)])), ws)
    docs = read_raw_documents(ws)
    assert markers([d["text"] for d in docs]) == EXPECTED and len(docs) == len(EXPECTED) == result.documents_total
    stats = result.per_source["local[0]"]
    assert stats["skipped"] == EXPECTED_SKIPS
    assert stats["repaired"] == {"invalid_utf8": 1, "mojibake": 1}
    where = {e["reason"]: e["where"] for e in stats["skipped_examples"]}
    assert where["malformed_line"].endswith("records.jsonl#L2")  # file and line of the bad line
    assert where["binary"].endswith("binary.txt")

    by_marker = {next(iter(markers([d["text"]]))): d for d in docs}
    html = by_marker["DOC-html"]
    assert html["title"] == "HTML Page" and html["content_type"] == "text/html"
    assert "Copyright" not in html["text"] and "tracking" not in html["text"] and "About" not in html["text"]
    assert by_marker["DOC-pdf"]["title"] == "A PDF Book" and json.loads(by_marker["DOC-pdf"]["meta"]) == {"pages": 1}
    epub = by_marker["DOC-epub"]
    assert "second chapter closes" in epub["text"] and epub["title"] == "An EPUB Book"
    assert json.loads(epub["meta"]) == {"author": "Ada Writer", "language": "en", "chapters": 2}
    assert by_marker["DOC-md"]["title"] == "Markdown Title"
    assert json.loads(by_marker["DOC-jsonl-1"]["meta"]) == {"lang": "en"} and by_marker["DOC-jsonl-1"]["title"] == "R1"
    assert by_marker["DOC-csv-2"]["uri"].endswith("table.csv#row=2")
    assert "across two lines" in by_marker["DOC-csv-2"]["text"]
    assert by_marker["DOC-zip-nested"]["uri"].endswith("bundle.zip!/docs/nested.jsonl.gz#L1")
    assert "café, naïve façade, déjà vu" in by_marker["DOC-latin1"]["text"]
    assert "crème brûlée" in by_marker["DOC-mojibake"]["text"]
    assert all(d["id"] and d["fetched_at"] and d["source"] == "local" for d in docs)


def test_archive_members_never_escape_and_nothing_is_extracted(corpus, tmp_path):
    ws = Workspace(tmp_path / "home")
    result = collect(_config(LocalSource(paths=[str(corpus / "bundle.zip"), str(corpus / "bundle.tar.gz")])), ws)
    refused = sorted(e["where"].split("!/", 1)[1] for e in result.per_source["local[0]"]["skipped_examples"]
                     if e["reason"] == "unsafe_archive_member")
    assert refused == ["../../escape.txt", "../evil.txt", "/abs/evil.txt", "passwd-link"]
    assert "DOC-evil" not in json.dumps(read_raw_documents(ws))
    written = [p for p in tmp_path.parent.rglob("*") if p.name in ("evil.txt", "escape.txt")]
    assert written == []


def test_compression_bomb_and_oversized_files_are_skipped(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    (root / "bomb.txt.gz").write_bytes(gzip.compress(b"a" * 3_000_000))
    (root / "ok.txt").write_text("A small file that fits the limit." + LONG)
    result = collect(_config(LocalSource(paths=[str(root)], max_file_bytes=1_000_000)), Workspace(tmp_path / "home"))
    assert result.documents_total == 1
    assert result.per_source["local[0]"]["skipped"] == {"too_large": 1}


def test_include_exclude_hidden_and_one_changed_file(tmp_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "keep.md").write_text("# Keep\n\nkept markdown" + LONG)
    (root / "sub" / "nested.txt").write_text("nested text" + LONG)
    (root / "sub" / "draft.txt").write_text("a draft, excluded" + LONG)
    (root / ".git").mkdir()
    (root / ".git" / "config.txt").write_text("hidden directory" + LONG)
    ws = Workspace(tmp_path / "home")
    cfg = _config(LocalSource(paths=[str(root)], include=["*.md", "sub/*.txt"], exclude=["*draft*"]))
    first = collect(cfg, ws)
    assert sorted(d["title"] for d in read_raw_documents(ws)) == ["Keep", "nested"]

    again = collect(cfg, ws)
    assert (again.documents_new, again.per_source["local[0]"]["unchanged"]) == (0, 2)

    (root / "sub" / "nested.txt").write_text("nested text, edited" + LONG)
    changed = collect(cfg, ws)
    assert (changed.documents_new, changed.documents_total) == (1, first.documents_total)
    assert changed.per_source["local[0]"]["changed"] == 1
    texts = [d["text"] for d in read_raw_documents(ws)]
    assert any("edited" in t for t in texts) and not any(t.startswith("nested text" + LONG) for t in texts)
    # the replaced document is gone from the shard files too, so readers of raw files see live rows only
    shard_texts = [t for p in raw_shard_paths(ws) for t in pq.read_table(p).column("text").to_pylist()]
    assert sorted(shard_texts) == sorted(texts)

    os.utime(root / "keep.md")  # touched, same content: re-hashed, not re-added
    touched = collect(cfg, ws)
    assert (touched.documents_new, touched.digest) == (0, changed.digest)


def test_process_pool_and_streamed_large_files_give_the_same_corpus(corpus, tmp_path):
    serial = collect(_config(LocalSource(paths=[str(corpus)])), Workspace(tmp_path / "serial"))
    parallel = ParallelConfig(backend="processes", workers=2, chunk_files=4, chunk_bytes=600)
    pooled = collect(_config(LocalSource(paths=[str(corpus)]), parallel=parallel), Workspace(tmp_path / "pooled"))
    assert pooled.digest == serial.digest and pooled.documents_total == serial.documents_total
    assert pooled.per_source["local[0]"]["skipped"] == serial.per_source["local[0]"]["skipped"]


def test_decoding_repairs_and_refuses():
    tally = Tally()
    russian = "Привет, как дела? Это текст на русском языке."
    assert decode_text(russian.encode("cp1251"), tally, "x").startswith("Привет")
    assert decode_text("Zażółć gęślą jaźń, to jest polski tekst.".encode("cp1250"), tally, "x").startswith("Zażółć")
    assert decode_text("the cafÃ© is open".encode(), tally, "x") == "the café is open"
    assert decode_text("\ufeffwith a byte order mark".encode("utf-8"), tally, "x") == "with a byte order mark"
    assert decode_text("utf-16 text".encode("utf-16"), tally, "x") == "utf-16 text"
    assert decode_text(bytes(range(32)) * 10, tally, "x") is None
    assert tally.repaired == {"invalid_utf8": 2, "mojibake": 1} and tally.skipped == {"binary": 1}


@pytest.mark.slow
def test_ray_backend_gives_the_same_corpus(corpus, tmp_path):
    serial = collect(_config(LocalSource(paths=[str(corpus)])), Workspace(tmp_path / "serial"))
    on_ray = ParallelConfig(backend="ray", workers=2, chunk_files=3)
    result = collect(_config(LocalSource(paths=[str(corpus)]), parallel=on_ray), Workspace(tmp_path / "ray"))
    assert result.digest == serial.digest and result.documents_total == len(EXPECTED)
    import ray

    assert not ray.is_initialized()  # the stage shut down the local Ray it started
