"""SFT record formats (OpenAI, ShareGPT, Alpaca, prompt/completion) to the canonical chat record; per-file
detection, the report of every skipped record with its exact reason and place, and the config keys."""

from __future__ import annotations

import json
import re

import pytest

from lmforge.config.instructions import InstructionConfig, LocalRecords, StdlibPairs
from lmforge.config.loader import parse_config
from lmforge.core.errors import ConfigError, DataError
from lmforge.core.report import record_counts
from lmforge.data.chat_formats import (
    RecordProblem,
    detect_format,
    from_alpaca,
    from_openai,
    from_prompt_completion,
    from_sharegpt,
)
from lmforge.data.record_files import FileReport, RecordSet, json_items, jsonl_items, read_file, require_records
from lmforge.data.sft import read_sft

U, A = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}


def _lines(*records) -> list[bytes]:
    return [(r if isinstance(r, str) else json.dumps(r)).encode() + b"\n" for r in records]


def test_openai_keeps_system_tool_calls_tool_results_and_tools():
    raw = {"id": 7, "tools": [{"type": "function", "function": {"name": "weather", "parameters": {}}}], "messages": [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
        {"role": "assistant", "content": "18 degrees."},
        {"role": "user", "content": "Thanks"},  # nothing answers it: dropped
    ]}
    record = from_openai(raw)
    assert record["id"] == "7" and record["tools"] == raw["tools"]
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert record["messages"][1]["content"] == "Weather in Paris?"
    assert record["messages"][2] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]}
    assert record["messages"][3] == {"role": "tool", "content": "18C", "tool_call_id": "c1"}
    legacy = from_openai({"messages": [U, {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}},
                                       {"role": "function", "name": "f", "content": "1"}, A]})
    assert legacy["messages"][1]["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}
    assert legacy["messages"][2] == {"role": "tool", "content": "1", "name": "f"}


def test_ids_are_the_sources_or_a_stable_content_hash():
    first, again = from_openai({"messages": [U, A]}), from_openai({"messages": [dict(U), dict(A)]})
    assert first["id"] == again["id"] and re.fullmatch(r"[0-9a-f]{64}", first["id"])
    assert from_openai({"messages": [U, {"role": "assistant", "content": "Other"}]})["id"] != first["id"]


def test_sharegpt_maps_speakers_system_function_calls_and_observations():
    record = from_sharegpt({"system": "You are helpful.", "tools": '[{"name": "calc"}]', "conversations": [
        {"from": "human", "value": "2+2?"},
        {"from": "function_call", "value": '{"name": "calc", "arguments": {"expr": "2+2"}}'},
        {"from": "observation", "value": "4"},
        {"from": "gpt", "value": "It is 4."},
    ]})
    assert record["messages"] == [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "calc", "arguments": '{"expr": "2+2"}'}}]},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "It is 4."},
    ]
    assert record["tools"] == [{"name": "calc"}]


def test_alpaca_joins_instruction_and_input_and_reads_system_and_history():
    plain = from_alpaca({"instruction": "Add", "input": "2 and 3", "output": "5"})
    assert plain["messages"] == [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    assert from_alpaca({"instruction": "Add", "input": "", "output": "5"})["messages"][0]["content"] == "Add"
    full = from_alpaca({"instruction": "And 3+3?", "output": "6", "system": "Math.", "history": [["1+1?", "2"]]})
    assert [(m["role"], m["content"]) for m in full["messages"]] == [
        ("system", "Math."), ("user", "1+1?"), ("assistant", "2"), ("user", "And 3+3?"), ("assistant", "6")]


def test_prompt_completion_as_strings_or_messages():
    assert from_prompt_completion({"prompt": "Hi", "completion": "Hello"})["messages"] == [U, A]
    chat = from_prompt_completion({"prompt": [{"role": "system", "content": "S"}, U], "completion": [A]})
    assert [m["role"] for m in chat["messages"]] == ["system", "user", "assistant"]


def test_format_is_detected_from_the_first_records_by_majority():
    assert detect_format([{"messages": []}]) == "openai"
    assert detect_format([{"conversations": []}]) == "sharegpt"
    assert detect_format([{"instruction": "", "output": ""}]) == "alpaca"
    assert detect_format([{"prompt": "", "completion": ""}]) == "prompt_completion"
    assert detect_format([{"prompt": "", "chosen": "", "rejected": ""}]) == "preference"
    assert detect_format([{"text": "x"}, "not a record", {"messages": []}, {"instruction": "", "output": ""},
                          {"messages": []}]) == "openai"
    assert detect_format([{"text": "x"}]) is None


def test_bad_records_are_skipped_with_exact_reasons_and_places():
    good = {"messages": [U, A]}
    lines = _lines(
        good,
        "{not json",
        [1, 2],
        {"messages": [U]},
        {"messages": [{"content": "Hi"}, A]},
        {"messages": [{"role": "wizard", "content": "Hi"}, A]},
        {"messages": [{"role": "user", "content": "   "}, A]},
        {"messages": [{"role": "user", "content": 5}, A]},
        {"messages": "Hi"},
        {"messages": [U, {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, A]},
        {"conversations": [U, A]},
        {"messages": [U, {"role": "assistant", "content": "Hello again"}]},
    )
    report = FileReport("chat.jsonl")
    records = read_file(jsonl_items(lines, "chat.jsonl"), "auto", "sft", report)
    assert report.format == "openai" and len(records) == 2
    assert [(e["where"], e["reason"]) for e in report.examples] == [
        ("chat.jsonl:2", "malformed_json"), ("chat.jsonl:3", "not_an_object"), ("chat.jsonl:4", "no_assistant_turn"),
        ("chat.jsonl:5", "missing_role"), ("chat.jsonl:6", "unknown_role"), ("chat.jsonl:7", "empty_turn"),
        ("chat.jsonl:8", "wrong_type"), ("chat.jsonl:9", "wrong_type"), ("chat.jsonl:10", "bad_tool_call"),
        ("chat.jsonl:11", "unsupported_content"), ("chat.jsonl:12", "missing_field")]
    assert report.examples[0]["detail"].startswith("line 2 is not JSON")
    assert report.examples[-1]["detail"] == "no `messages` (format openai)"
    assert report.skipped == 11 and sum(report.reasons.values()) == 11


def test_a_configured_format_overrides_detection():
    report = FileReport("f.jsonl")
    records = read_file(jsonl_items(_lines({"messages": [U, A]}, {"prompt": "Hi", "completion": "Hello"}), "f.jsonl"),
                        "prompt_completion", "sft", report)
    assert len(records) == 1 and report.format == "prompt_completion" and dict(report.reasons) == {"missing_field": 1}


def test_json_files_give_each_array_element_its_line_and_read_json_lines_too():
    array = b'[\n  {"instruction": "a", "output": "1"},\n  {"instruction": "", "output": "2"},\n\n  {"x": 1}\n]\n'
    items = list(json_items(array, "d.json"))
    assert [where for where, _ in items] == ["d.json:2", "d.json:3", "d.json:5"]
    broken = list(json_items(b'[{"instruction": "a", "output": "1"},\n {"instruction": oops}]', "b.json"))
    assert broken[0][0] == "b.json:1" and isinstance(broken[1][1], RecordProblem)
    assert broken[1][0] == "b.json:2" and broken[1][1].reason == "malformed_json"
    lines = list(json_items(b'{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n', "l.json"))
    assert [where for where, _ in lines] == ["l.json:1", "l.json:2"]
    assert [where for where, _ in json_items(b'  {"prompt": "a", "completion": "b"}', "one.json")] == ["one.json:1"]


def test_a_file_without_usable_records_is_a_data_error_naming_it_and_the_fix():
    report = FileReport("empty.jsonl")
    read_file(jsonl_items(_lines({"messages": [U]}, "{bad"), "empty.jsonl"), "auto", "sft", report)
    with pytest.raises(DataError, match=re.escape("empty.jsonl has no usable record (1 no_assistant_turn, 1 malformed_json")):
        require_records(report)
    unknown = FileReport("text.jsonl")
    read_file(jsonl_items(_lines({"text": "just text"}), "text.jsonl"), "auto", "sft", unknown)
    with pytest.raises(DataError, match="unknown_format") as info:
        require_records(unknown)
    assert "set `format:` on its source" in info.value.fix
    with pytest.raises(DataError, match="holds no records"):
        require_records(FileReport("nothing.jsonl"))
    with pytest.raises(DataError, match="holds preference records") as info:
        read_file(jsonl_items(_lines({"prompt": "p", "chosen": "a", "rejected": "b"}), "p.jsonl"), "auto", "sft",
                  FileReport("p.jsonl"))
    assert "data.preferences.sources" in info.value.fix


def test_repeated_records_and_ids_are_skipped_first_one_wins():
    report = FileReport("f.jsonl")
    records = read_file(jsonl_items(_lines({"id": "a", "messages": [U, A]}, {"id": "a", "messages": [U, A]},
                                           {"id": "a", "messages": [{"role": "user", "content": "Other"}, A]}),
                                    "f.jsonl"), "auto", "sft", report)
    merged = RecordSet()
    merged.add(records, report)
    assert list(merged.records) == ["a"] and report.read == 1
    assert [(e["where"], e["reason"]) for e in report.examples] == [("f.jsonl:2", "duplicate"),
                                                                     ("f.jsonl:3", "duplicate_id")]


def test_config_keeps_stdlib_default_and_the_old_switch_and_refuses_contradictions():
    assert InstructionConfig().sources == [StdlibPairs()]
    assert InstructionConfig(source="none").sources == []
    assert InstructionConfig(source="stdlib").sources == [StdlibPairs()]
    both = InstructionConfig(source="stdlib", sources=[StdlibPairs(), LocalRecords(paths=["a.jsonl"])])
    assert both.sources[1].format == "auto"
    config = parse_config({"data": {"instructions": {"sources": [
        {"type": "local", "paths": ["data/chat.jsonl"]},
        {"type": "hf", "dataset": "json", "data_files": ["data/alpaca.json"], "format": "alpaca"}]},
        "preferences": {"sources": [{"type": "local", "paths": ["data/prefs.jsonl"]}]}}})
    assert [s.type for s in config.data.instructions.sources] == ["local", "hf"]
    assert config.data.preferences.sources[0].format == "auto"
    assert parse_config({}).data.preferences.sources == []
    for bad, message in [
        ({"source": "none", "sources": [{"type": "local", "paths": ["a"]}]}, "`source: none` says no SFT set"),
        ({"source": "stdlib", "sources": [{"type": "local", "paths": ["a"]}]}, "has no `type: stdlib` entry"),
        ({"sources": [{"type": "local", "paths": ["a"], "format": "preference"}]}, "move it to data.preferences"),
        ({"sources": [{"type": "local", "paths": ["a"]}, {"type": "local", "paths": ["b"], "name": "local[0]"}]},
         "names must be unique"),
        ({"sources": [{"type": "local", "paths": ["a"], "text_field": "x"}]}, "unknown key"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_config({"data": {"instructions": bad}}, "c.yaml")
    with pytest.raises(ConfigError, match="an SFT format"):
        parse_config({"data": {"preferences": {"sources": [{"type": "s3", "bucket": "bkt", "format": "alpaca"}]}}})
    with pytest.raises(ConfigError, match=re.escape("data.preferences.sources.0")):
        parse_config({"data": {"preferences": {"sources": [{"type": "stdlib"}]}}})


def test_read_sft_reads_chats_and_pairs_as_written(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"id": "x", "messages": [U, A]}) + "\n"
                    + json.dumps({"id": "y", "instruction": "Q", "response": "R"}) + "\n")
    assert read_sft(path) == [{"id": "x", "messages": [U, A]}, {"id": "y", "instruction": "Q", "response": "R"}]


def test_run_summary_counts_per_source():
    written = {"train": 3, "test": 1, "sources": {"chat": {"type": "local", "read": 4, "skipped": 2, "files": []}}}
    assert record_counts(written) == {"train": 3, "test": 1, "sources": {"chat": {"read": 4, "skipped": 2}}}
    assert record_counts({}) is None


def test_readme_fine_tuning_data_example_is_valid():
    import yaml
    from conftest import REPO

    block = (REPO / "README.md").read_text().split("## Your own fine-tuning data", 1)[1]
    config = parse_config(yaml.safe_load(block.split("```yaml\n", 1)[1].split("```", 1)[0]), "README.md")
    assert [s.type for s in config.data.instructions.sources] == ["local", "hf", "stdlib"]
    assert config.data.instructions.sources[1].format == "alpaca" and len(config.data.preferences.sources) == 1
