"""The data gate's instruction/chat and preference suites on real Great Expectations: a good chat set
and preference set pass beside the corpus suite; a bad chat set (role order, empty turns, no
assistant answer, duplicates) and a preference record whose answers are equal stop the flow with
a report naming each expectation, how many records failed and which."""

from __future__ import annotations

import json

import pytest

from lmforge.config.validation import ValidationConfig
from lmforge.core.errors import ValidationFailed
from lmforge.core.workspace import Workspace
from lmforge.data.documents import text_id, write_documents
from lmforge.stages.validate import validate

CFG = ValidationConfig(min_documents=4, data_docs=False)
USER, ANSWER = {"role": "user", "content": "How deep is the harbour?"}, {"role": "assistant", "content": "Twelve metres."}
RECORD_NAMES = ["row_count", "id_unique", "role_order", "no_empty_turns", "assistant_turn", "record_length",
                "turn_count", "duplicate_share", "no_pii"]


def _doc(text: str) -> dict:
    return {"id": text_id(text), "text": text, "source": "local", "uri": "file:///x", "title": "x",
            "fetched_at": "2026-01-01T00:00:00+00:00", "content_type": "text/plain", "meta": "{}"}


def _chat(i: int, topic: str) -> dict:
    return {"id": f"c{i}", "messages": [{"role": "system", "content": "Answer like a harbour pilot."},
                                        {"role": "user", "content": f"Question {i}: what about {topic}?"},
                                        {"role": "assistant", "content": f"Answer {i}: {topic} matter at sea."}]}


def _write(ws: Workspace, sft_train: list[dict], sft_test: list[dict], prefs: list[dict] | None = None) -> None:
    docs = [_doc(f"Curated document {i} about {t}, plain words for the gate.") for i, t in
            enumerate(["tides", "knots", "gulls", "charts", "buoys"])]
    write_documents(ws.curated_dir / "train.parquet", docs[:4])
    write_documents(ws.curated_dir / "validation.parquet", docs[4:])
    for folder, name, records in ((ws.sft_dir, "train", sft_train), (ws.sft_dir, "test", sft_test),
                                  (ws.preferences_dir, "train", prefs), (ws.preferences_dir, "test", [])):
        if records is not None:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _pref(i: int, chosen: str, rejected: str) -> dict:
    return {"id": f"p{i}", "prompt": [{"role": "user", "content": f"Pick a mooring {i}."}],
            "chosen": [{"role": "assistant", "content": chosen}], "rejected": [{"role": "assistant", "content": rejected}]}


def test_good_chat_and_preference_sets_pass_the_gate(tmp_path):
    ws = Workspace(tmp_path)
    _write(ws, [_chat(i, t) for i, t in enumerate(["fog", "ice", "wind"])], [_chat(9, "rain")],
           [_pref(0, "The sheltered one.", "The open one."), _pref(1, "Near the quay.", "On the rocks.")])
    report = validate(CFG, ws)

    assert report.success and [r.suite for r in report.record_sets] == ["instruction_records", "preference_records"]
    sft, prefs = report.record_sets
    assert [r["name"] for r in sft.results] == RECORD_NAMES and sft.documents == 4
    assert [r["name"] for r in prefs.results] == [*RECORD_NAMES, "chosen_differs"]
    saved = json.loads((ws.validation_dir / "result.json").read_text())
    assert [s["suite"] for s in saved["record_sets"]] == ["instruction_records", "preference_records"]
    assert "instruction_records: validation passed on 4 rows" in report.render()


def test_bad_chat_set_fails_the_gate_with_the_report(tmp_path):
    ws = Workspace(tmp_path)
    good = [_chat(i, t) for i, t in enumerate(["fog", "ice", "wind", "rain"])]
    bad = [
        {"id": "twice-user", "messages": [USER, USER, ANSWER]},
        {"id": "late-system", "messages": [USER, {"role": "system", "content": "Be brief."}, ANSWER]},
        {"id": "empty", "messages": [{"role": "user", "content": " "}, ANSWER]},
        {"id": "no-answer", "messages": [USER]},
        {**good[0], "id": "copy-1"}, {**good[0], "id": "copy-2"},
    ]
    _write(ws, good + bad, [], [_pref(0, "Same.", "Same."), _pref(1, "Near the quay.", "On the rocks.")])

    with pytest.raises(ValidationFailed) as info:
        validate(CFG, ws)

    err = info.value
    assert "curated_documents" not in err.cause  # the corpus passed; only the record suites failed
    sft, prefs = err.details["record_sets"]
    failed = {r["name"]: r for r in sft["results"] if not r["success"]}
    assert set(failed) == {"role_order", "no_empty_turns", "assistant_turn", "duplicate_share"}
    assert failed["role_order"]["observed"] == "3 of 10 rows unexpected"
    assert {(s["record"], s["role_order"]) for s in failed["role_order"]["samples"]} == {
        ("train/twice-user", "user_after_user"), ("train/late-system", "system_not_first"),
        ("train/no-answer", "ends_with_user")}
    assert [s["record"] for s in failed["no_empty_turns"]["samples"]] == ["train/empty"]
    assert [s["record"] for s in failed["duplicate_share"]["samples"]] == ["train/copy-1", "train/copy-2"]
    assert [r["name"] for r in prefs["results"] if not r["success"]] == ["chosen_differs"]
    for name in ("instruction_records", "role_order", "duplicate_share", "preference_records", "chosen_differs"):
        assert name in err.cause
    assert "FAIL role_order" in err.report and "train/twice-user" in err.report
    assert "instruction_records.json" in err.fix
    assert json.loads((ws.validation_dir / "instruction_records.json").read_text())["success"] is False
