"""Curation of instruction/chat and preference records: rendering, PII, length, dedup across splits,
decontamination, evaluation texts of chat test sets, the per-record validation features, and which
file later stages read (curated or collected)."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.config.curation import CurationConfig, DecontaminationConfig, RecordCurationConfig
from lmforge.core.hashing import sha256_file
from lmforge.core.workspace import Workspace
from lmforge.curation.decontaminate import EvalIndex, eval_texts, record_contaminated
from lmforge.curation.record_sets import RecordSet, clean_set, decontaminate_set
from lmforge.curation.records import content_chars, record_text
from lmforge.curation.report import Tally
from lmforge.data.sft import CURATED_INPUTS, sft_file
from lmforge.validation.records import empty_turns, features, role_order

SYSTEM = {"role": "system", "content": "You are a careful assistant who answers questions about the sea and ships."}
EVAL_ANSWER = "A lighthouse keeper trimmed the wick every evening so the beam reached ships far beyond the reef."


def chat(record_id: str, user: str, answer: str, system: bool = False) -> dict:
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"id": record_id, "messages": ([SYSTEM] if system else []) + turns}


def tool_chat() -> dict:
    call = {"id": "c1", "type": "function", "function": {"name": "tide", "arguments": '{"port": "Brest"}'}}
    return {"id": "tool", "messages": [
        {"role": "user", "content": "When is high tide in Brest?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"high": "14:02"}'},
        {"role": "assistant", "content": "High tide in Brest is at 14:02."}]}


def record_set(train: list[dict], test: list[dict], steps: list[str]) -> RecordSet:
    return RecordSet("instructions", Path("sft"), Path("curated-sft"), RecordCurationConfig(steps=steps),
                     {"train": train, "test": test}, {}, Tally(), {"train": len(train), "test": len(test)})


def test_rendering_covers_every_turn_and_record_shape():
    text = record_text(tool_chat())
    assert "assistant: tide({\"port\": \"Brest\"})" in text and "tool: {\"high\": \"14:02\"}" in text
    pair = {"id": "p", "instruction": "Why?", "response": "Because."}
    assert record_text(pair) == "user: Why?\nassistant: Because." and content_chars(pair) == 12
    pref = {"id": "x", "prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}],
            "rejected": [{"role": "assistant", "content": "Go away"}]}
    assert record_text(pref) == "user: Hi\nchosen:\nassistant: Hello\nrejected:\nassistant: Go away"


def test_eval_texts_read_chat_and_preference_records_without_system_turns(tmp_path):
    path = tmp_path / "test.jsonl"
    pref = {"id": "p", "prompt": [SYSTEM, {"role": "user", "content": "Why do tides turn?"}],
            "chosen": [{"role": "assistant", "content": "The moon."}], "rejected": [{"role": "assistant", "content": "Wind."}]}
    lines = [chat("a", "Tell me about lighthouses.", EVAL_ANSWER, system=True), pref,
             {"id": "b", "instruction": "What is a reef?", "response": "Rock under the sea."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    texts = eval_texts(path, ["instruction", "response"])
    assert texts == ["Tell me about lighthouses.", EVAL_ANSWER, "Why do tides turn?", "The moon.", "Wind.",
                     "What is a reef?", "Rock under the sea."]
    assert SYSTEM["content"] not in texts  # one shared system prompt must not contaminate every record


def test_pii_length_and_dedup_on_both_splits():
    test = [chat("t1", "Describe the old harbour at dawn please.", "Fishing boats leave while gulls circle the quay.")]
    train = [
        chat("dup-a", "How do sailors tie a bowline knot?", "Make a loop, pass the end up through it, around and down."),
        chat("dup-b", "How do sailors tie a bowline knot?", "Make a loop, pass the end up through it, around and down."),
        chat("near", "How do sailors tie a bowline knot?", "Make a loop, pass the end up through it, around and back down."),
        chat("leak", "Describe the old harbour at dawn please.", "Fishing boats leave while gulls circle the quay."),
        chat("pii", "Who sells charts?", "Write to harbour.master@port.example.com for the charts."),
        chat("long", "Tell me everything.", "word " * 200),
        tool_chat(),
    ]
    rs = record_set(train, test, ["pii", "length", "exact_dedup", "near_dedup"])
    rs.cfg = RecordCurationConfig(steps=rs.cfg.steps, max_chars=500)
    clean_set(rs, CurationConfig())

    assert [r["id"] for r in rs.records["train"]] == ["dup-a", "pii", "tool"]
    assert [r["id"] for r in rs.records["test"]] == ["t1"]  # records never change sides
    assert rs.tally.removed == {"exact_duplicate": 1, "near_duplicate": 1, "duplicate_of_test": 1, "too_long": 1}
    scrubbed = rs.records["train"][1]["messages"][1]["content"]
    assert scrubbed == "Write to <EMAIL> for the charts." and rs.tally.changed["pii.email"] == 1
    steps = {row["step"]: row for row in rs.summary()["steps"]}
    assert steps["length"]["removed"] == {"too_long": 1} and steps["exact_dedup"]["records_in"] == 7
    assert list(steps) == ["pii", "length", "exact_dedup", "near_dedup"]
    assert rs.summary()["train_out"] == 3 and rs.summary()["pii_replaced"] == {"email": 1}


def test_tool_call_arguments_are_scrubbed():
    record = tool_chat()
    record["messages"][1]["tool_calls"][0]["function"]["arguments"] = '{"to": "jane@mail.example.com"}'
    rs = record_set([record], [], ["pii"])
    clean_set(rs, CurationConfig())
    assert rs.records["train"][0]["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"to": "<EMAIL>"}'


def test_contaminated_train_records_are_dropped_whole():
    index = EvalIndex([EVAL_ANSWER], DecontaminationConfig())
    quoted = chat("quoted", "Quote the keeper story.", "As told: " + EVAL_ANSWER.lower() + " The end.")
    clean = chat("clean", "What is a reef?", "A ridge of rock or coral near the surface of the sea.")
    assert record_contaminated(quoted, index) and not record_contaminated(clean, index)
    rs = record_set([quoted, clean], [], ["decontaminate"])
    decontaminate_set(rs, index)
    assert [r["id"] for r in rs.records["train"]] == ["clean"] and rs.tally.removed == {"contaminated": 1}


def test_role_order_and_empty_turn_features():
    assert role_order(tool_chat()["messages"]) == "ok"
    assert role_order(chat("s", "Hi there", "Hello", system=True)["messages"]) == "ok"
    user, answer = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}
    assert role_order([user, SYSTEM, answer]) == "system_not_first"
    assert role_order([user, user, answer]) == "user_after_user"
    assert role_order([answer]) == "assistant_after_start"
    assert role_order([user, answer, {"role": "tool", "content": "x"}, answer]) == "tool_without_call"
    calling = tool_chat()["messages"][1]
    assert role_order([user, calling, user, answer]) == "tool_call_without_result"
    assert role_order([user]) == "ends_with_user"
    empty = {"id": "e", "messages": [{"role": "user", "content": "  "}, answer]}
    assert empty_turns(empty) == 1 and empty_turns(tool_chat()) == 0  # a tool-calling turn needs no text
    pref = {"id": "p", "prompt": [user], "chosen": [answer], "rejected": [answer]}
    row = features(pref, "train", preference=True)
    assert row["chosen_differs"] == 0 and row["assistant_turns"] == 1 and row["role_order"] == "ok"


def test_later_stages_read_the_curated_set_only_while_it_matches_the_collected_one(tmp_path):
    ws = Workspace(tmp_path)
    ws.sft_dir.mkdir(parents=True)
    ws.curated_sft_dir.mkdir(parents=True)
    collected = ws.sft_dir / "train.jsonl"
    collected.write_text(json.dumps(chat("a", "Hi", "Hello")) + "\n")
    assert sft_file(ws, "train") == collected  # nothing curated yet
    (ws.curated_sft_dir / "train.jsonl").write_text(collected.read_text())
    (ws.curated_sft_dir / "report.json").write_text(json.dumps({CURATED_INPUTS: {"train.jsonl": sha256_file(collected)}}))
    assert sft_file(ws, "train") == ws.curated_sft_dir / "train.jsonl"
    assert sft_file(ws, "test") == ws.sft_dir / "test.jsonl"  # no curated test split
    collected.write_text(json.dumps(chat("b", "Bye", "Goodbye")) + "\n")  # a new collect: the curated set is stale
    assert sft_file(ws, "train") == collected
