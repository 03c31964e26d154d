"""Hostile and malformed input to the collect stage (issue 20): links out of a source, files that break
a parser, credentials in URLs, documents too large to hold, leftovers of a killed curate.

Real files in a temporary directory read by the real local source; no server, no subprocess.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import tracemalloc
from pathlib import Path

import pytest

from lmforge.collection.local import LocalFiles
from lmforge.collection.types import SourceContext, Tally
from lmforge.collection.web import WebCrawl
from lmforge.config.curation import CurationConfig
from lmforge.config.data import LocalSource, ParallelConfig, WebSource
from lmforge.core.workspace import Workspace
from lmforge.data.documents import text_id, write_documents
from lmforge.stages.curate import curate

LONG = " It is long enough to be a real document, with a sentence or two about collecting text."


def _read(source, parallel: ParallelConfig | None = None) -> tuple[list[dict], Tally]:
    """Every document the source yields, and its tally (errors propagate, as in the stage)."""
    tally = Tally()
    ctx = SourceContext("test", lambda uri: None, tally, Path("/nonexistent-scratch"), parallel or ParallelConfig())
    docs = [doc for unit in source.units(ctx) for doc in (unit.docs or [])]
    return docs, tally


@pytest.fixture
def outside(tmp_path) -> Path:
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("SECRET-OUTSIDE the source, never to be collected." + LONG)
    return secret


def test_file_links_out_of_the_source_are_skipped_with_a_reason(tmp_path, outside):
    src = tmp_path / "src"
    (src / "inner").mkdir(parents=True)
    (src / "inner" / "real.txt").write_text("DOC-real inside the source." + LONG)
    (src / "inner" / "passwd.txt").symlink_to("/etc/passwd")
    (src / "secret.txt").symlink_to(outside)
    (src / "up.txt").symlink_to("../outside/secret.txt")  # relative, still outside
    (src / "alias.txt").symlink_to(src / "inner" / "real.txt")  # a link inside the source is followed
    docs, tally = _read(LocalFiles(LocalSource(paths=[str(src)])))
    texts = " ".join(d["text"] for d in docs)
    assert "SECRET-OUTSIDE" not in texts and "root:" not in texts
    assert "DOC-real" in texts
    assert tally.skipped["symlink_outside_source"] == 3
    skipped = {e["where"].rsplit("/", 1)[-1] for e in tally.examples if e["reason"] == "symlink_outside_source"}
    assert skipped == {"passwd.txt", "secret.txt", "up.txt"}


@pytest.mark.parametrize("chunk_bytes", [32 * 2**20, 1000], ids=["read-whole", "streamed"])
def test_one_bad_file_never_aborts_the_source(tmp_path, chunk_bytes):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"good-{i:02d}.txt").write_text(f"DOC-good-{i} a good file." + LONG)
    (src / "deep.json").write_text("[" * 200_000)
    (src / "deep.jsonl").write_text(json.dumps({"text": "DOC-line-1" + LONG}) + "\n" + "[" * 200_000 + "\n"
                                    + json.dumps({"text": "DOC-line-3" + LONG}) + "\n")
    (src / "deepmeta.jsonl").write_text('{"text": "DOC-deepmeta' + LONG + '", "x": ' + "[" * 900 + "]" * 900 + "}\n")
    (src / "broken.pdf").write_bytes(b"%PDF-1.7\n" + b"<<" * 50_000)
    (src / "broken.epub").write_bytes(b"PK\x03\x04 not really a zip")
    docs, tally = _read(LocalFiles(LocalSource(paths=[str(src)])), ParallelConfig(chunk_bytes=chunk_bytes))
    texts = " ".join(d["text"] for d in docs)
    assert all(f"DOC-good-{i} " in texts for i in range(20))
    assert "DOC-line-1" in texts and "DOC-line-3" in texts
    where = {e["where"].rsplit("/", 1)[-1]: e for e in tally.examples}
    assert "RecursionError" in where["deep.json"]["detail"]
    assert "deep.jsonl#L2" in where
    assert {"broken.pdf", "broken.epub"} <= set(where)


def test_a_document_larger_than_max_document_bytes_is_skipped_in_bounded_memory(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    limit = 1_000_000
    (src / "huge.txt").write_bytes(b"word " * (4 * limit // 5))  # one line, 4x the limit
    (src / "ok.txt").write_text("DOC-ok a normal file." + LONG)
    (src / "records.jsonl").write_bytes(json.dumps({"text": "DOC-small" + LONG}).encode() + b"\n"
                                        + b'{"text": "' + b"x" * (2 * limit) + b'"}\n'
                                        + json.dumps({"text": "DOC-after" + LONG}).encode() + b"\n")
    source = LocalFiles(LocalSource(paths=[str(src)], max_document_bytes=limit))
    tracemalloc.start()
    try:
        docs, tally = _read(source, ParallelConfig(chunk_bytes=1000))  # every file streams alone
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sorted(d["text"].split()[0] for d in docs) == ["DOC-after", "DOC-ok", "DOC-small"]
    assert tally.skipped["too_large"] == 2
    assert all("max_document_bytes" in e["detail"] for e in tally.examples if e["reason"] == "too_large")
    assert peak < 3 * limit  # the 4 MB file and the 2 MB line were never held whole


def test_credentials_in_urls_are_redacted_and_such_seeds_dropped_with_a_reason():
    from lmforge.collection.urls import redact_url, redact_urls  # new in issue 20: imported here, see the tests above

    assert redact_url("https://user:s3cret@example.org:8080/a?b=1") == "https://***@example.org:8080/a?b=1"
    assert redact_url("https://example.org/a") == "https://example.org/a"
    text = "failed https://tok3n@example.org/x and http://u:p4ss@10.0.0.1/ today"
    assert "tok3n" not in redact_urls(text) and "p4ss" not in redact_urls(text)
    assert redact_urls({"seeds": ["http://u:p4ss@h.example/"], "n": 1}) == {"seeds": ["http://***@h.example/"], "n": 1}

    tally = Tally()
    tally.skip("unreachable", "http://u:p4ss@h.example/", "GET http://u:p4ss@h.example/ failed")
    assert "p4ss" not in json.dumps(tally.examples)

    crawl = WebCrawl(WebSource(seeds=["https://alice:s3cret@example.org/"], max_depth=0))
    docs, tally = _read(crawl)
    assert docs == [] and tally.skipped == {"credentials_in_url": 1}
    assert "s3cret" not in json.dumps(tally.examples) and "example.org" in tally.examples[0]["where"]


def _raw_workspace(tmp_path: Path) -> Workspace:
    ws = Workspace(tmp_path / "home")
    texts = [f"Paragraph {i} about rivers and bridges, long enough for the length filter of the curate stage."
             for i in range(6)]
    write_documents(ws.raw_dir / "docs-00000.parquet", [
        {"id": text_id(t), "text": t, "source": "local", "uri": "file:///x", "title": "x",
         "fetched_at": "2026-01-01T00:00:00+00:00", "content_type": "text/plain", "meta": "{}"} for t in texts])
    return ws


def test_curate_removes_work_directories_of_killed_runs_but_not_live_ones(tmp_path):
    ws = _raw_workspace(tmp_path)
    ws.data_dir.mkdir(parents=True, exist_ok=True)
    killed = ws.data_dir / ".curate-work-killed"  # its owner died: its lock is free
    (killed / "part").mkdir(parents=True)
    (killed / "owner.lock").write_text("")
    legacy = ws.data_dir / ".curate-work-legacy"  # left by an older version, no lock file, a day old
    legacy.mkdir()
    day_ago = time.time() - 86_400
    os.utime(legacy, (day_ago, day_ago))
    live = ws.data_dir / ".curate-work-live"  # another curate is running: it holds the lock
    live.mkdir()
    with open(live / "owner.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        curate(CurationConfig(steps=["length", "exact_dedup"], ray_min_documents=0), ws)
        assert live.exists()
    assert not killed.exists() and not legacy.exists()
    assert sorted(p.name for p in ws.data_dir.glob(".curate-work-*")) == [".curate-work-live"]


def test_lmforge_run_hands_prefect_a_config_without_url_passwords():
    # Prefect stores a flow run's parameters; collect drops such URLs anyway, so nothing is lost.
    from lmforge.cli import redacted_for_flow
    from lmforge.config import parse_config

    config = parse_config({"data": {"sources": [
        {"type": "web", "seeds": ["https://alice:s3cret@example.org/a", "https://example.org/b"]},
        {"type": "feed", "urls": ["https://bob:t0ken@example.org/feed.xml"]}]}})
    flowed = redacted_for_flow(config)
    assert "s3cret" not in flowed.model_dump_json() and "t0ken" not in flowed.model_dump_json()
    assert flowed.data.sources[0].seeds == ["https://***@example.org/a", "https://example.org/b"]
    assert flowed.model_copy(update={"data": config.data}) == config  # only the URLs changed
    assert redacted_for_flow(parse_config({})) is not None
