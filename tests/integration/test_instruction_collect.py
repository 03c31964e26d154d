"""`lmforge collect` on the user's own fine-tuning data: a chat file (local), an Alpaca file (through the
`datasets` json loader), a preference file; S3 and web record files on loopback servers; the canonical
sets and the report written, and a file with no usable record stopping the stage with its fix."""

from __future__ import annotations

import gzip
import json

import yaml
from conftest import run_cli
from fixtures.collect.s3 import client, s3_server
from fixtures.collect.site import Site

from lmforge.config.data import DataConfig, LocalSource
from lmforge.config.instructions import InstructionConfig, PreferenceConfig, S3Records, WebRecords
from lmforge.config.locations import FetchConfig
from lmforge.core.workspace import Workspace
from lmforge.data.sft import read_sft
from lmforge.stages.collect import collect

SYSTEM = {"role": "system", "content": "You answer in one line."}
CHATS = [
    {"messages": [SYSTEM, {"role": "user", "content": f"What is {n} squared?"},
                  {"role": "assistant", "content": f"{n * n}."}, {"role": "user", "content": "And doubled?"},
                  {"role": "assistant", "content": f"{2 * n}."}]} for n in range(6)
] + [{"messages": [{"role": "user", "content": "Weather in Oslo?"},
                   {"role": "assistant", "tool_calls": [{"id": "w1", "type": "function",
                                                         "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
                   {"role": "tool", "tool_call_id": "w1", "content": "-3C"},
                   {"role": "assistant", "content": "Minus three degrees."}],
      "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]}]
ALPACA = [{"instruction": f"Spell {w} backwards.", "input": "", "output": w[::-1]} for w in ("cat", "dog", "owl", "elk")]
PREFS = [{"prompt": f"Name a prime above {n}.", "chosen": str(p), "rejected": str(p + 1)}
         for n, p in ((1, 2), (4, 5), (6, 7), (10, 11), (12, 13))]


def _jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _data(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("A short document so the corpus is not empty. " * 20)
    (tmp_path / "chat.jsonl").write_text(_jsonl(CHATS) + "{truncated\n" + json.dumps({"messages": [SYSTEM]}) + "\n")
    (tmp_path / "alpaca.json").write_text(json.dumps(ALPACA, indent=2))
    (tmp_path / "prefs.jsonl").write_text(_jsonl(PREFS) + json.dumps({"prompt": "x", "chosen": "y", "rejected": "y"}) + "\n")


def test_collect_cli_writes_canonical_sets_and_reports_every_file(tmp_path):
    _data(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data": {
        "sources": [{"type": "local", "paths": [str(tmp_path / "docs")]}],
        "progress_interval_s": 0,
        "instructions": {"test_fraction": 0.25, "sources": [
            {"type": "local", "name": "chats", "paths": [str(tmp_path / "chat.jsonl")]},
            {"type": "hf", "dataset": "json", "data_files": [str(tmp_path / "alpaca.json")], "format": "alpaca"}]},
        "preferences": {"sources": [{"type": "local", "paths": [str(tmp_path / "prefs.jsonl")]}]},
    }}))
    home = tmp_path / "home"
    proc = run_cli(["collect", str(config), "--json"], home)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    sft = result["instructions"]
    assert sft["train"] + sft["test"] == len(CHATS) + len(ALPACA) and sft["test"] >= 1
    chats = sft["sources"]["chats"]
    assert (chats["read"], chats["skipped"]) == (len(CHATS), 2)
    assert chats["files"][0]["format"] == "openai"
    assert chats["files"][0]["reasons"] == {"malformed_json": 1, "no_assistant_turn": 1}
    assert chats["files"][0]["examples"][0]["where"] == f"{tmp_path / 'chat.jsonl'}:{len(CHATS) + 1}"
    assert sft["sources"]["hf[1]"]["files"][0] | {"examples": []} == {
        "file": "hf://json/train", "format": "alpaca", "read": 4, "skipped": 0, "reasons": {}, "examples": []}
    prefs = result["preferences"]
    assert prefs["train"] + prefs["test"] == len(PREFS)
    assert prefs["sources"]["local[0]"]["files"][0]["reasons"] == {"identical_choices": 1}

    ws = Workspace(home)
    records = read_sft(ws.sft_dir / "train.jsonl") + read_sft(ws.sft_dir / "test.jsonl")
    assert all(r["messages"][-1]["role"] == "assistant" for r in records)
    by_first = {r["messages"][1]["content"] if r["messages"][0]["role"] == "system" else r["messages"][0]["content"]: r
                for r in records}
    assert by_first["What is 3 squared?"]["messages"][-1] == {"role": "assistant", "content": "6."}
    tool = by_first["Weather in Oslo?"]
    assert tool["tools"][0]["function"]["name"] == "weather"
    assert tool["messages"][1]["tool_calls"][0]["function"] == {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}
    assert tool["messages"][2] == {"role": "tool", "content": "-3C", "tool_call_id": "w1"}
    assert by_first["Spell owl backwards."]["messages"][1] == {"role": "assistant", "content": "lwo"}
    assert json.loads((ws.sft_dir / "report.json").read_text())["sources"]["chats"]["read"] == len(CHATS)
    manifest = json.loads((ws.raw_dir / "manifest.json").read_text())  # the collect state carries both reports
    assert manifest["sft"]["sources"]["chats"]["skipped"] == 2 and manifest["preferences"]["train"] == prefs["train"]
    pref_lines = [json.loads(line) for name in ("train.jsonl", "test.jsonl")
                  for line in (ws.preferences_dir / name).read_text().splitlines()]
    assert sorted(r["chosen"][0]["content"] for r in pref_lines) == ["11", "13", "2", "5", "7"]
    assert all(r["prompt"][0]["role"] == "user" and r["rejected"][0]["role"] == "assistant" for r in pref_lines)

    # Same data, same split: ids are content hashes, so a rerun writes the same files.
    before = (ws.sft_dir / "test.jsonl").read_text()
    assert run_cli(["collect", str(config), "--json"], home).returncode == 0
    assert (ws.sft_dir / "test.jsonl").read_text() == before

    # A file with no usable record stops the stage (before any document is fetched) with cause and fix.
    (tmp_path / "chat.jsonl").write_text(json.dumps({"text": "not a chat"}) + "\n")
    failed = run_cli(["collect", str(config)], home)
    assert failed.returncode != 0
    assert f"{tmp_path / 'chat.jsonl'} has no usable record (1 unknown_format" in failed.stderr
    assert "set `format:` on its source" in failed.stderr and "Traceback" not in failed.stderr
    assert (ws.sft_dir / "test.jsonl").read_text() == before  # the last good set is untouched


def test_s3_and_web_record_files_are_read_with_the_document_sources_listing_and_fetcher(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("A short document so the corpus is not empty. " * 20)
    alpaca = json.dumps(ALPACA).encode()
    site = Site(routes={"/robots.txt": (404, {}, b""),
                        "/sets/alpaca.json": (200, {"content-type": "application/json"}, alpaca)}).start()
    try:
        with s3_server() as endpoint:
            s3c = client(endpoint)
            s3c.create_bucket(Bucket="sets")
            s3c.put_object(Bucket="sets", Key="chat/part-1.jsonl.gz", Body=gzip.compress(_jsonl(CHATS[:3]).encode()))
            s3c.put_object(Bucket="sets", Key="chat/README.md", Body=b"# not records")
            s3c.put_object(Bucket="sets", Key="prefs/p.json", Body=json.dumps(PREFS).encode())
            cfg = DataConfig(
                sources=[LocalSource(paths=[str(docs)])], progress_interval_s=0,
                instructions=InstructionConfig(sources=[
                    S3Records(bucket="sets", prefix="chat/", endpoint_url=endpoint),
                    WebRecords(urls=[site.url("/sets/alpaca.json")], allow_networks=["127.0.0.1/32"],
                               fetch=FetchConfig(requests_per_second=100, retries=0, timeout_s=5))]),
                preferences=PreferenceConfig(sources=[S3Records(bucket="sets", prefix="prefs/", endpoint_url=endpoint,
                                                                format="preference")]))
            result = collect(cfg, Workspace(tmp_path / "home"))
    finally:
        site.stop()
    s3_report = result.instructions["sources"]["s3[0]"]
    assert s3_report["read"] == 3 and s3_report["files"][0]["file"] == "s3://sets/chat/part-1.jsonl.gz"
    assert [s["reason"] for s in s3_report["files_skipped"]] == ["not_a_record_file"]
    web_report = result.instructions["sources"]["web[1]"]
    assert web_report["files"][0]["format"] == "alpaca" and web_report["read"] == len(ALPACA)
    assert result.sft_train + result.sft_test == 3 + len(ALPACA)
    assert result.preferences["train"] + result.preferences["test"] == len(PREFS)
