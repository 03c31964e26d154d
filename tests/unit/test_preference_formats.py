"""Preference records (prompt, chosen, rejected) to the canonical form: strings, message lists, whole
conversations sharing the prompt, an implicit prompt; and the records skipped with their reasons."""

from __future__ import annotations

import json

import pytest

from lmforge.core.errors import DataError
from lmforge.data.chat_formats import RecordProblem
from lmforge.data.preference_formats import from_preference
from lmforge.data.record_files import FileReport, jsonl_items, read_file

Q = {"role": "user", "content": "Capital of France?"}


def _say(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_strings_become_one_user_turn_and_one_assistant_answer_each():
    record = from_preference({"id": "p1", "prompt": "2+2?", "chosen": "4", "rejected": "5", "system": "Math."})
    assert record == {"id": "p1", "prompt": [{"role": "system", "content": "Math."}, {"role": "user", "content": "2+2?"}],
                      "chosen": [_say("4")], "rejected": [_say("5")]}


def test_message_lists_and_whole_conversations_that_share_the_prompt():
    listed = from_preference({"prompt": [Q], "chosen": [_say("Paris")], "rejected": [_say("Lyon")]})
    whole = from_preference({"prompt": [Q], "chosen": [Q, _say("Paris")], "rejected": [Q, _say("Lyon")]})
    implicit = from_preference({"chosen": [Q, _say("Paris")], "rejected": [Q, _say("Lyon")]})
    for record in (listed, whole, implicit):
        assert (record["prompt"], record["chosen"], record["rejected"]) == ([Q], [_say("Paris")], [_say("Lyon")])
    assert listed["id"] == whole["id"] == implicit["id"]  # same content, same id
    turns = from_preference({"chosen": [Q, _say("Paris"), {"role": "user", "content": "Sure?"}, _say("Yes")],
                             "rejected": [Q, _say("Paris"), {"role": "user", "content": "Sure?"}, _say("No")]})
    assert [m["role"] for m in turns["prompt"]] == ["user", "assistant", "user"] and turns["chosen"] == [_say("Yes")]


@pytest.mark.parametrize(("raw", "reason"), [
    ({"prompt": "p", "chosen": "a"}, "missing_field"),
    ({"chosen": "a", "rejected": "b"}, "missing_field"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical_choices"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "x"}, _say("a")], "rejected": "b"}, "bad_completion"),
    ({"chosen": [_say("a")], "rejected": [_say("b")]}, "no_prompt"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "empty_turn"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "wrong_type"),
    ({"prompt": [{"content": "p"}], "chosen": "a", "rejected": "b"}, "missing_role"),
])
def test_bad_preference_records_name_their_reason(raw, reason):
    with pytest.raises(RecordProblem) as info:
        from_preference(raw)
    assert info.value.reason == reason


def test_a_preference_file_is_detected_reported_and_refused_under_instructions():
    lines = [json.dumps(r).encode() for r in (
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": "p", "chosen": "x", "rejected": "x"},
    )] + [b"{oops"]
    report = FileReport("prefs.jsonl")
    records = read_file(jsonl_items(lines, "prefs.jsonl"), "auto", "preference", report)
    assert report.format == "preference" and [r["chosen"] for _, r in records] == [[_say("4")]]
    assert [(e["where"], e["reason"]) for e in report.examples] == [("prefs.jsonl:2", "identical_choices"),
                                                                     ("prefs.jsonl:3", "malformed_json")]
    with pytest.raises(DataError, match="holds openai SFT records, listed as preferences"):
        read_file(jsonl_items([json.dumps({"messages": [Q, _say("Paris")]}).encode()], "chat.jsonl"), "auto",
                  "preference", FileReport("chat.jsonl"))
