"""The curate stage on a chat set beside a small corpus: a duplicate and two contaminated train records
dropped (one repeats the test split, one a held-out document), an e-mail scrubbed, documents
decontaminated against the chat test record, and later stages pointed at the curated set."""

from __future__ import annotations

import json

import pytest

from lmforge.config.curation import CurationConfig, NearDedupConfig
from lmforge.core.errors import DataError
from lmforge.core.workspace import Workspace
from lmforge.curation.decontaminate import eval_texts
from lmforge.data.documents import read_documents, text_id, write_documents
from lmforge.data.sft import read_sft, sft_file
from lmforge.data.splits import heldout_ids
from lmforge.stages.curate import curate

TOPICS = ["rivers", "violins", "glaciers", "bread", "bees", "chess", "tea", "walls", "birds", "maps", "clocks", "salt"]
TEST_ANSWER = "The keeper trimmed the lamp wick each evening so that its beam reached ships beyond the outer reef."
STEPS = ["clean_whitespace", "length", "pii", "decontaminate", "exact_dedup", "near_dedup"]
CONFIG = CurationConfig(steps=STEPS, ray_min_documents=0, near_dedup=NearDedupConfig(previous_versions=0))


def doc(text: str) -> dict:
    return {"id": text_id(text), "text": text, "source": "local", "uri": "file:///x", "title": "x",
            "fetched_at": "2026-01-01T00:00:00+00:00", "content_type": "text/plain", "meta": "{}"}


def chat(record_id: str, user: str, answer: str) -> dict:
    return {"id": record_id, "messages": [{"role": "system", "content": "Answer briefly."},
                                          {"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def write_jsonl(path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def workspace(tmp_path):
    ws = Workspace(tmp_path)
    texts = [f"A plain paragraph number {i} about {topic}, long enough to pass every filter of this small test corpus."
             for i, topic in enumerate(TOPICS)]
    texts.append("An old logbook says: " + TEST_ANSWER + " Nobody remembers who wrote it down.")
    write_documents(ws.raw_dir / "docs-00000.parquet", [doc(t) for t in texts])
    heldout = sorted(heldout_ids([text_id(t) for t in texts[:-1]] + [text_id(texts[-1])], CONFIG.heldout_fraction))
    held_text = next(t for t in texts if text_id(t) == heldout[0])
    answer = "A ridge of rock or coral that lies near the surface of the sea and wrecks careless ships."
    train = [
        chat("reef", "What is a reef?", answer),
        chat("reef-again", "What is a reef?", answer),
        chat("leak-test", "Tell the lighthouse story.", "It goes: " + TEST_ANSWER),
        chat("leak-heldout", "Recite the paragraph.", held_text),
        chat("email", "Who sells charts?", "Write to harbour.master@port.example.com for the charts."),
    ]
    write_jsonl(ws.sft_dir / "train.jsonl", train)
    write_jsonl(ws.sft_dir / "test.jsonl", [chat("lighthouse", "What did the keeper do?", TEST_ANSWER)])
    return ws


def test_curate_stage_curates_the_chat_set(workspace):
    ws = workspace
    result = curate(CONFIG, ws)

    sft = result.record_sets["instructions"]
    assert sft["removed"] == {"contaminated": 2, "exact_duplicate": 1}
    assert (sft["train_in"], sft["train_out"], sft["test_in"], sft["test_out"]) == (5, 2, 1, 1)
    assert sft["pii_replaced"] == {"email": 1}
    assert [(s["step"], s["records_in"], s["records_out"]) for s in sft["steps"]] == [
        ("pii", 6, 6), ("length", 6, 6), ("exact_dedup", 6, 5), ("near_dedup", 5, 5), ("decontaminate", 4, 2)]
    assert sft_file(ws, "train") == ws.curated_sft_dir / "train.jsonl"
    train = read_sft(sft_file(ws, "train"))
    assert [r["id"] for r in train] == ["reef", "email"]
    assert train[1]["messages"][2]["content"] == "Write to <EMAIL> for the charts."
    report = json.loads((ws.curated_sft_dir / "report.json").read_text())
    assert set(report["inputs"]) == {"train.jsonl", "test.jsonl"}
    assert {s["id"] for s in report["samples"]["contaminated"]} == {"leak-test", "leak-heldout"}
    # Documents are decontaminated against the chat test record (its answer is cut from the logbook).
    assert result.changed["decontaminate.spans"] == 1
    texts = [d["text"] for split in ("train", "validation") for d in read_documents(ws.curated_dir / f"{split}.parquet")]
    assert not any("trimmed the lamp wick" in t for t in texts)
    assert json.loads((ws.curated_dir / "report.json").read_text())["record_sets"]["instructions"]["train_out"] == 2
    assert eval_texts(sft_file(ws, "test"), ["instruction", "response"]) == ["What did the keeper do?", TEST_ANSWER]


def test_a_set_curation_empties_stops_the_stage_before_anything_is_written(workspace):
    ws = workspace
    strict = CONFIG.model_copy(update={"instructions": CONFIG.instructions.model_copy(update={"max_chars": 5})})
    with pytest.raises(DataError) as info:
        curate(strict, ws)
    assert "instructions set" in info.value.cause and "too_long" in info.value.cause
    assert "curation.instructions.max_chars" in info.value.fix
    assert not ws.curated_dir.exists() and not ws.curated_sft_dir.exists()
