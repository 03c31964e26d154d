"""Curate stage on real fixtures: the messy corpus (every kind of mess, exact counts per reason),
near-dedup across shards and against earlier versions, PII rules, classic steps, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO, run_cli

from lmforge.config import load_config, parse_config
from lmforge.config.curation import CurationConfig, PiiConfig
from lmforge.config.data import DataConfig, InstructionConfig, LocalSource
from lmforge.core.errors import ConfigError, DataError
from lmforge.core.workspace import Workspace
from lmforge.curation.pii import ScrubPii, find_pii
from lmforge.data.documents import read_documents, text_id, write_documents
from lmforge.stages.collect import collect
from lmforge.stages.curate import curate

FIXTURE = REPO / "tests" / "fixtures" / "curate"
CONFIG = FIXTURE / "config.yaml"
LONG = "Curated documents need enough text to pass the length filter of this test. "

# What the messy corpus must report (see tests/fixtures/curate/make_corpus.py for each case).
EXPECTED_REMOVED = {
    "boilerplate_only": 1, "contaminated": 1, "exact_duplicate": 2, "language": 4, "near_duplicate": 2,
    "quality.alpha_words": 1, "quality.duplicate_lines": 1, "too_short": 1,
}
EXPECTED_PII = {"credit_card": 1, "email": 2, "ip_address": 1, "phone": 1, "secret": 1}


def _collect_messy(home: Path) -> Workspace:
    ws = Workspace(home)
    collect(load_config(CONFIG).data, ws)
    ws.sft_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURE / "eval.jsonl", ws.sft_dir / "test.jsonl")  # the evaluation set to decontaminate
    return ws


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    ws = _collect_messy(tmp_path_factory.mktemp("messy"))
    return ws, curate(load_config(CONFIG).curation, ws)


def _texts(ws: Workspace) -> list[str]:
    return [d["text"] for split in ("train", "validation") for d in read_documents(ws.curated_dir / f"{split}.parquet")]


def test_messy_corpus_counts_every_reason(messy):
    ws, result = messy
    assert result.documents_in == 34
    assert result.removed == EXPECTED_REMOVED
    assert result.documents_out == 34 - sum(EXPECTED_REMOVED.values()) == 21
    assert result.pii_replaced == EXPECTED_PII
    assert result.changed["boilerplate.lines"] >= 11 and result.changed["decontaminate.spans"] >= 2
    steps = {s["step"]: s for s in result.steps}
    assert steps["near_dedup"]["removed"] == {"near_duplicate": 2}
    assert steps["quality"]["documents_in"] == steps["language"]["documents_out"]

    report = json.loads((ws.curated_dir / "report.json").read_text())
    assert report["removed"] == EXPECTED_REMOVED and report["dataset_digest"] == result.dataset_digest
    assert set(report["samples"]) == set(EXPECTED_REMOVED)
    assert "Der kleine Hafen" in " ".join(s["text"] for s in report["samples"]["language"])


def test_messy_corpus_output_is_clean(messy):
    ws, _ = messy
    texts = _texts(ws)
    joined = "\n".join(texts)
    assert "<EMAIL>" in joined and "<CREDIT_CARD>" in joined and "<SECRET>" in joined
    assert not any(find_pii(t) for t in texts)
    assert "café" in joined and "Ã" not in joined  # mojibake repaired
    assert "<p>" not in joined and "track()" not in joined  # HTML and scripts gone
    assert "Subscribe to our newsletter" not in joined and "stores cookies" not in joined  # boilerplate
    assert "beam visible for many miles" not in joined  # the evaluation text is cut out
    assert "Keepers climbed the tower at dusk." in joined  # ... the rest of that document stays
    for split in ("train", "validation"):
        for doc in read_documents(ws.curated_dir / f"{split}.parquet"):
            assert doc["id"] == text_id(doc["text"])
            meta = json.loads(doc["meta"])
            assert "raw_id" in meta and meta["language"] == "en"


def test_cli_curate_json_last_line_and_same_digest_twice(tmp_path, messy):
    _, first = messy
    home = tmp_path / "home"
    assert run_cli(["collect", str(CONFIG)], home).returncode == 0
    (home / "data" / "sft").mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURE / "eval.jsonl", home / "data" / "sft" / "test.jsonl")
    for _ in range(2):  # the second run dedups against the first version and must not change
        done = run_cli(["curate", str(CONFIG), "--json"], home)
        assert done.returncode == 0, done.stderr
        facts = json.loads(done.stdout.strip().splitlines()[-1])
        assert facts["removed"] == EXPECTED_REMOVED and facts["pii_replaced"] == EXPECTED_PII
        assert (facts["documents_in"], facts["documents_out"]) == (34, 21)
        assert facts["dataset_digest"] == first.dataset_digest
    gate = run_cli(["validate", str(CONFIG), "--json"], home)  # the README's third command
    assert gate.returncode == 0, gate.stderr
    assert json.loads(gate.stdout.strip().splitlines()[-1])["success"] is True


# ---------------------------------------------------------------- the original small fixture


def _collect_small(tmp_path) -> Workspace:
    """12 distinct texts plus 3 that duplicate others after cleanup, and 2 that are too short."""
    root = tmp_path / "src"
    root.mkdir(parents=True)
    records = [f"Document {i} is about topic {i * 7}. {LONG}" for i in range(12)]
    records += [
        f"Document  0 is about topic 0.   {LONG}\r\n",  # whitespace variant of document 0
        f"Document 1 is about topic 7.\x00 {LONG}",  # control character variant of document 1
        f"Document ２ is about topic 14. {LONG}",  # full-width digit: NFKC makes it document 2
        "tiny",
        "short one",
    ]
    (root / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in records) + "\n")
    ws = Workspace(tmp_path / "home")
    collect(DataConfig(sources=[LocalSource(paths=[str(root)])], instructions=InstructionConfig(source="none")), ws)
    return ws


# Templated documents are near duplicates of each other by design; these tests use exact dedup only.
SMALL = dict(min_chars=40, steps=["normalize", "clean_whitespace", "length", "exact_dedup"])


def test_small_corpus_counts_and_is_deterministic(tmp_path):
    ws = _collect_small(tmp_path)
    result = curate(CurationConfig(heldout_fraction=0.2, **SMALL), ws)
    assert result.documents_in == 17 and result.documents_out == 12
    assert result.removed == {"exact_duplicate": 3, "too_short": 2}
    assert [s["step"] for s in result.steps] == SMALL["steps"]
    assert pq.read_table(ws.curated_dir / "train.parquet").column_names[:2] == ["id", "text"]
    train_bytes = (ws.curated_dir / "train.parquet").read_bytes()
    again = curate(CurationConfig(heldout_fraction=0.2, **SMALL), ws)
    assert again.dataset_digest == result.dataset_digest
    assert (ws.curated_dir / "train.parquet").read_bytes() == train_bytes
    other = _collect_small(tmp_path / "again")  # same texts, another workspace and fetch time
    assert curate(CurationConfig(heldout_fraction=0.2, **SMALL), other).dataset_digest == result.dataset_digest


def test_two_documents_still_give_a_validation_document(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    (root / "a.txt").write_text(LONG + "first")
    (root / "b.txt").write_text("Another text with other words, enough to differ from the first one entirely.")
    ws = Workspace(tmp_path / "home")
    collect(DataConfig(sources=[LocalSource(paths=[str(root)])], instructions=InstructionConfig(source="none")), ws)
    result = curate(CurationConfig(min_chars=10, heldout_fraction=0.01, steps=["length", "exact_dedup"]), ws)
    assert (result.train_documents, result.validation_documents) == (1, 1)


# ---------------------------------------------------------------- near dedup across shards and versions


def _doc(text: str) -> dict:
    return {"id": text_id(text), "text": text, "source": "local", "uri": "file:///x", "title": "x",
            "fetched_at": "2026-01-01T00:00:00+00:00", "content_type": "text/plain", "meta": "{}"}


BASE = [
    "Rivers carry sediment from the mountains to the sea, building deltas where the current slows down "
    "and drops its load of sand and silt across a wide fan of channels and marshes.",
    "A violin's sound comes from the bow setting the strings in motion, while the wooden body amplifies "
    "the vibration and gives each instrument the warm voice that players recognize at once.",
    "Winter storms on the northern coast can move entire dunes in a single night, and villagers plant "
    "grass on the slopes every spring to hold the sand in place against the wind.",
]


def test_near_duplicates_across_shards_and_against_earlier_versions(tmp_path):
    ws = Workspace(tmp_path)
    write_documents(ws.raw_dir / "docs-00000.parquet", [_doc(BASE[0]), _doc(BASE[1])])
    twin = _doc(BASE[0].replace("and marshes.", "and swamps."))
    write_documents(ws.raw_dir / "docs-00001.parquet", [twin, _doc(BASE[2])])
    cfg = CurationConfig(min_chars=10, steps=["normalize", "clean_whitespace", "exact_dedup", "near_dedup"])
    first = curate(cfg, ws)
    assert first.removed == {"near_duplicate": 1} and first.documents_out == 3

    again = curate(cfg, ws)  # the same input against its own earlier version: nothing changes
    assert (again.removed, again.dataset_digest) == (first.removed, first.dataset_digest)

    # Version 2 drops a document and brings a near twin of it: the twin repeats version 1.
    write_documents(ws.raw_dir / "docs-00001.parquet", [twin, _doc(BASE[2].replace("the wind.", "the gales."))])
    second = curate(cfg, ws)
    assert second.removed == {"near_duplicate": 1, "near_duplicate_previous_version": 1}
    assert second.previous_versions[0] == first.dataset_digest and second.documents_out == 2
    no_versions = CurationConfig(**{**cfg.model_dump(), "near_dedup": {"previous_versions": 0}})
    assert curate(no_versions, ws).removed == {"near_duplicate": 1}


@pytest.mark.slow
def test_ray_gives_the_same_result_as_in_process(tmp_path):
    ws = Workspace(tmp_path)
    write_documents(ws.raw_dir / "docs-00000.parquet", [_doc(BASE[0]), _doc(BASE[1])])
    write_documents(ws.raw_dir / "docs-00001.parquet", [_doc(BASE[0] + " "), _doc(BASE[2])])
    local = curate(CurationConfig(min_chars=10, ray_min_documents=0), ws)
    on_ray = curate(CurationConfig(min_chars=10, ray_min_documents=1), ws)
    assert json.loads((ws.curated_dir / "report.json").read_text())["ray"] is True
    assert (on_ray.dataset_digest, on_ray.removed) == (local.dataset_digest, local.removed)


# ---------------------------------------------------------------- single steps


def test_pii_rules():
    scrub = ScrubPii(PiiConfig())
    doc = {"text": "card 4111-1111-1111-1111 but not 4111-1111-1111-1112; mail a.b@mail.example.com; "
                   "hosts 127.0.0.1 and 10.0.0.8 stay, 8.8.8.8 goes; call (555) 010-4477; version 3.11.7; "
                   "token ghp_" + "a1B2" * 9 + " and password = hunter2hunter2hunter2x9", "meta": {}}
    scrub(doc)
    text = doc["text"]
    assert text.count("<CREDIT_CARD>") == 1 and "4111-1111-1111-1112" in text
    assert "<EMAIL>" in text and "127.0.0.1" in text and "10.0.0.8" in text and "<IP_ADDRESS> goes" in text
    assert "<PHONE>" in text and "3.11.7" in text and text.count("<SECRET>") == 2
    assert dict(scrub.counts) == {"credit_card": 1, "email": 1, "ip_address": 1, "phone": 1, "secret": 2}
    assert find_pii(text) == []


def test_classic_steps_segment_chinese_remove_stopwords_and_stem(tmp_path):
    ws = Workspace(tmp_path)
    write_documents(ws.raw_dir / "docs-00000.parquet", [
        _doc("The runners were running quickly through the parks of the cities."),
        _doc("我们在公园里跑步，天气很好。"),
    ])
    cfg = CurationConfig(min_chars=5, steps=["normalize", "clean_whitespace", "exact_dedup", "segment_words",
                                             "remove_stopwords", "stem"])
    curate(cfg, ws)
    texts = sorted(_texts(ws))
    assert "runner run quick park citi ." in texts
    chinese = next(t for t in texts if "公园" in t)
    assert "我们" not in chinese.split() and "跑步" in chinese.split()  # jieba words, stop word dropped


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("section, message", [
    ({"min_chars": 500, "max_chars": 100}, "min_chars"),
    ({"steps": ["near_dedup", "pii"]}, "must come before"),
    ({"steps": ["normalize", "spellcheck"]}, "unknown curation step"),
    ({"quality": {"min_words": 50, "max_words": 10}}, "min_words"),
    ({"near_dedup": {"num_perm": 64, "bands": 10, "rows": 10}}, "exceeds num_perm"),
    ({"language": {"keep": ["english"]}}, "ISO 639"),
])
def test_nonsensical_thresholds_are_rejected_when_the_config_loads(section, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_config({"curation": section}, "c.yaml")
    assert "c.yaml" in info.value.cause


def test_missing_raw_data_says_to_collect_first(tmp_path):
    with pytest.raises(DataError, match="no raw documents") as info:
        curate(CurationConfig(), Workspace(tmp_path))
    assert "lmforge collect" in info.value.fix


def test_missing_text_column_is_named(tmp_path):
    import pyarrow as pa

    ws = Workspace(tmp_path)
    ws.raw_dir.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a"], "body": ["no text column here"]}), ws.raw_dir / "docs-00000.parquet")
    with pytest.raises(DataError, match="text") as info:
        curate(CurationConfig(), ws)
    assert "collect" in info.value.fix


def test_everything_filtered_names_the_filter_and_fix(tmp_path):
    ws = _collect_small(tmp_path)
    with pytest.raises(DataError) as info:
        curate(CurationConfig(min_chars=5_000, max_chars=10_000), ws)
    assert "`too_short` filter removed the most" in info.value.cause
    assert "curation.min_chars" in info.value.fix
    assert not (ws.curated_dir / "train.parquet").exists()
