"""Collect stage and the built-in stdlib corpus: real files in a temporary workspace."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from lmforge.collect import SHARD_NAME, collect
from lmforge.config.stages import DataConfig, InstructionConfig, LocalSource, StdlibSource
from lmforge.data.stdlib_docs import build_instruction_pairs, iter_stdlib_docs
from lmforge.errors import DataError
from lmforge.workspace import Workspace


@pytest.fixture(scope="module")
def stdlib_corpus() -> list[dict]:
    return list(iter_stdlib_docs([], 1_000_000))


def test_stdlib_corpus_is_large_documented_and_deterministic(stdlib_corpus):
    size = sum(len(d["text"].encode()) for d in stdlib_corpus)
    assert size >= 500_000
    assert list(iter_stdlib_docs([], 1_000_000)) == stdlib_corpus
    assert len({d["id"] for d in stdlib_corpus}) == len(stdlib_corpus)
    json_doc = next(d for d in stdlib_corpus if d["uri"] == "stdlib://json")
    assert "json.dumps(obj, *, skipkeys=False" in json_doc["text"]
    assert "Serialize ``obj`` to a JSON formatted ``str``" in json_doc["text"]
    assert json_doc["source"] == "stdlib" and json_doc["content_type"] == "text/x-python-docstring"
    assert not any(d["meta"]["module"].split(".")[0] in {"test", "idlelib", "tkinter", "antigravity"}
                   for d in stdlib_corpus)


def test_stdlib_modules_and_byte_budget_are_respected():
    docs = list(iter_stdlib_docs(["json"], 1_000_000))
    assert docs and {d["meta"]["module"].split(".")[0] for d in docs} == {"json"}
    assert len(list(iter_stdlib_docs(["json"], 1))) == 1  # stops once the budget is reached
    with pytest.raises(DataError, match="not_a_module"):
        list(iter_stdlib_docs(["not_a_module"], 1000))


def test_instruction_pairs_describe_known_functions():
    pairs = build_instruction_pairs(2000)
    assert len(pairs) == 2000
    assert pairs == build_instruction_pairs(2000)
    by_instruction = {p["instruction"]: p["response"] for p in pairs}
    assert len(by_instruction) == len(pairs)
    assert by_instruction["What does `json.dumps` do?"] == "Serialize ``obj`` to a JSON formatted ``str``."
    assert all(10 < len(p["response"]) <= 200 and len(p["id"]) == 64 for p in pairs)


def _local_dir(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Alpha\n\nThe alpha document talks about parsing text files.\n")
    (docs / "b.txt").write_text("The beta document is plain text about tokenizers.\n")
    (docs / "skip.csv").write_text("not,included\n")
    (docs / "c.jsonl").write_text(json.dumps({"text": "Gamma record one.", "title": "g1"}) + "\n"
                                  + json.dumps({"text": "Gamma record two."}) + "\n")
    return docs


def test_collect_writes_shard_manifest_sft_and_is_incremental(tmp_path):
    ws = Workspace(tmp_path / "home")
    docs = _local_dir(tmp_path)
    cfg = DataConfig(sources=[StdlibSource(modules=["json"], max_bytes=20_000), LocalSource(paths=[str(docs)])],
                     instructions=InstructionConfig(max_records=50, test_fraction=0.2))
    seen = []
    first = collect(cfg, ws, progress=lambda name, done, total: seen.append((name, done, total)))

    assert seen == [("stdlib[0]", 1, 2), ("local[1]", 2, 2)]
    assert first.errors == []
    assert first.per_source["local[1]"] == {"documents": 4, "new": 4}
    assert first.documents_new == first.documents_total > 4
    table = pq.read_table(ws.raw_dir / SHARD_NAME)
    assert table.column_names == ["id", "text", "source", "uri", "title", "fetched_at", "content_type", "meta"]
    assert table.num_rows == first.documents_total
    assert set(table.column("source").to_pylist()) == {"stdlib", "local"}
    assert "Alpha" in table.column("title").to_pylist()
    manifest = json.loads((ws.raw_dir / "manifest.json").read_text())
    assert manifest["digest"] == first.digest and manifest["documents"] == first.documents_total
    train = (ws.sft_dir / "train.jsonl").read_text().splitlines()
    test = (ws.sft_dir / "test.jsonl").read_text().splitlines()
    assert len(train) + len(test) == 50 and len(test) >= 1
    assert set(json.loads(train[0])) == {"id", "instruction", "response"}

    again = collect(cfg, ws)
    assert again.documents_new == 0 and again.digest == first.digest
    assert (ws.sft_dir / "train.jsonl").read_text().splitlines() == train

    (docs / "d.txt").write_text("A delta document arrives later.\n")
    third = collect(cfg, ws)
    assert third.documents_new == 1 and third.documents_total == first.documents_total + 1
    assert third.digest != first.digest


def test_failing_source_is_reported_while_others_finish(tmp_path):
    ws = Workspace(tmp_path / "home")
    cfg = DataConfig(sources=[LocalSource(paths=[str(tmp_path / "missing")]), LocalSource(paths=[str(_local_dir(tmp_path))])],
                     instructions=InstructionConfig(source="none"))
    result = collect(cfg, ws)
    assert [e["source"] for e in result.errors] == ["local[0]"]
    assert "does not exist" in result.errors[0]["error"]
    assert result.per_source["local[1]"]["new"] == 4 and result.documents_total == 4
    assert not (ws.sft_dir / "train.jsonl").exists()
    assert json.loads((ws.raw_dir / "manifest.json").read_text())["last_run"]["errors"] == result.errors


def test_empty_corpus_names_cause_and_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json}\n")
    cfg = DataConfig(sources=[LocalSource(paths=[str(tmp_path / "empty")]), LocalSource(paths=[str(bad)])])
    with pytest.raises(DataError) as info:
        collect(cfg, Workspace(tmp_path / "home"))
    assert "no documents were collected" in info.value.cause and "bad.jsonl:1" in info.value.cause
    assert "data.sources" in info.value.fix
    assert not (tmp_path / "home" / "data" / "raw" / SHARD_NAME).exists()
