"""Curate stage on a small real fixture collected from local files."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from lmforge.collect import collect, read_documents, text_id
from lmforge.config.stages import CurationConfig, DataConfig, InstructionConfig, LocalSource
from lmforge.curate import curate
from lmforge.errors import DataError
from lmforge.workspace import Workspace

LONG = "Curated documents need enough text to pass the length filter of this test. "


def _collect_fixture(tmp_path) -> Workspace:
    """12 distinct texts plus 3 that duplicate others after cleanup, and 2 that are too short."""
    root = tmp_path / "src"
    root.mkdir(parents=True)
    records = [f"Document {i}. {LONG}" for i in range(12)]
    records += [
        f"Document  0.   {LONG}\r\n",  # whitespace variant of document 0
        f"Document 1.\x00 {LONG}",  # control character variant of document 1
        f"Document ２. {LONG}",  # full-width digit: NFKC makes it document 2
        "tiny",
        "short one",
    ]
    lines = [json.dumps({"text": text}) for text in records]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    ws = Workspace(tmp_path / "home")
    collect(DataConfig(sources=[LocalSource(paths=[str(root)])], instructions=InstructionConfig(source="none")), ws)
    return ws


@pytest.fixture()
def ws(tmp_path) -> Workspace:
    return _collect_fixture(tmp_path)


def test_curate_counts_removals_and_splits(ws):
    result = curate(CurationConfig(min_chars=40, heldout_fraction=0.2), ws)

    assert result.documents_in == 17
    assert result.removed == {"empty": 0, "exact_duplicate": 3, "too_short": 2, "too_long": 0}
    assert result.documents_out == 12
    assert [s["step"] for s in result.steps] == ["normalize_unicode", "clean_whitespace", "exact_dedup",
                                                  "length_filter"]
    train = read_documents(ws.curated_dir / "train.parquet")
    validation = read_documents(ws.curated_dir / "validation.parquet")
    assert len(train) + len(validation) == 12 and len(validation) >= 1
    for doc in train + validation:
        assert doc["id"] == text_id(doc["text"])
        assert "  " not in doc["text"] and "\x00" not in doc["text"] and "\r" not in doc["text"]
        assert "raw_id" in json.loads(doc["meta"])
    assert pq.read_table(ws.curated_dir / "train.parquet").column_names[:2] == ["id", "text"]
    report = json.loads((ws.curated_dir / "report.json").read_text())
    assert report["dataset_digest"] == result.dataset_digest and report["removed"] == result.removed


def test_curate_is_deterministic(ws, tmp_path):
    cfg = CurationConfig(min_chars=40)
    first = curate(cfg, ws)
    train_bytes = (ws.curated_dir / "train.parquet").read_bytes()
    second = curate(cfg, ws)
    assert second.dataset_digest == first.dataset_digest
    assert (ws.curated_dir / "train.parquet").read_bytes() == train_bytes
    other = _collect_fixture(tmp_path / "again")  # same texts, another workspace and fetch time
    assert curate(cfg, other).dataset_digest == first.dataset_digest


def test_two_documents_still_give_a_validation_document(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    (root / "a.txt").write_text(LONG + "first")
    (root / "b.txt").write_text(LONG + "second")
    ws = Workspace(tmp_path / "home")
    collect(DataConfig(sources=[LocalSource(paths=[str(root)])], instructions=InstructionConfig(source="none")), ws)
    result = curate(CurationConfig(min_chars=10, heldout_fraction=0.01), ws)
    assert (result.train_documents, result.validation_documents) == (1, 1)


def test_missing_raw_data_says_to_collect_first(tmp_path):
    with pytest.raises(DataError, match="no raw documents") as info:
        curate(CurationConfig(), Workspace(tmp_path))
    assert "lmforge collect" in info.value.fix


def test_everything_filtered_names_the_filter_and_fix(ws):
    with pytest.raises(DataError) as info:
        curate(CurationConfig(min_chars=5_000, max_chars=10_000), ws)
    assert "`too_short` filter removed the most" in info.value.cause
    assert "curation.min_chars" in info.value.fix
    assert not (ws.curated_dir / "train.parquet").exists()
