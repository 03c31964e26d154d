"""The evaluate stage on a tiny random Llama and tiny held-out data in a real workspace."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from tiny_assets import write_workspace_data

from lmforge.config.evaluation import EvaluationConfig
from lmforge.core.errors import DataError
from lmforge.core.workspace import Workspace
from lmforge.stages.evaluate import evaluate

CFG = EvaluationConfig(max_batches=2, batch_size=4, block_size=32, max_examples=3, max_new_tokens=6)


@pytest.fixture(scope="module")
def evaluated(model_dir, tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("eval") / "home").ensure()
    write_workspace_data(ws)
    return ws, evaluate(CFG, model_dir, ws)


def test_evaluate_scores_and_writes_report(evaluated):
    ws, result = evaluated

    m = result.metrics
    assert math.isfinite(m["eval_loss"]) and m["eval_loss"] > 0
    assert m["eval_perplexity"] == pytest.approx(math.exp(m["eval_loss"]))
    # A random model over a 320-token vocabulary is close to uniform: perplexity near the vocab size.
    assert 50 < m["eval_perplexity"] < 2000
    assert 0.0 <= m["eval_exact_match"] <= 1.0
    assert 0.0 <= m["eval_rouge_l"] <= 1.0
    # The text budget is 2 batches x 4 windows x 32 tokens; every token of the chosen text is predicted.
    assert 0 < m["eval_heldout_tokens"] <= 2 * 4 * 32
    assert m["eval_bits_per_byte"] == pytest.approx(
        m["eval_loss"] * m["eval_heldout_tokens"] / math.log(2) / m["eval_heldout_bytes"])
    assert result.frozen_set["bytes"] == m["eval_heldout_bytes"] and len(result.frozen_set["digest"]) == 64
    assert len(result.examples) == 3
    first = result.examples[0]
    assert set(first) == {"instruction", "reference", "prediction", "exact_match", "rouge_l"}
    assert first["instruction"] == "What does `abs` do?"
    assert isinstance(first["prediction"], str)

    report = json.loads(Path(result.report_path).read_text())
    assert report["metrics"] == pytest.approx(m)
    assert report["examples"][0]["reference"] == first["reference"]
    state = ws.read_state("evaluate")
    assert state["report_path"] == result.report_path and state["metrics"]["eval_loss"] == m["eval_loss"]


def test_evaluate_is_deterministic(model_dir, evaluated):
    ws, first = evaluated
    second = evaluate(CFG, model_dir, ws)
    assert first.metrics == second.metrics
    assert [e["prediction"] for e in first.examples] == [e["prediction"] for e in second.examples]


@pytest.mark.parametrize(
    ("remove", "names"),
    [
        ("data/curated/validation.parquet", ["validation.parquet", "lmforge curate"]),
        ("data/sft/test.jsonl", ["test.jsonl", "lmforge collect"]),
    ],
)
def test_missing_inputs_name_file_and_command(model_dir, ws, remove, names):
    (ws.home / remove).unlink()
    with pytest.raises(DataError) as err:
        evaluate(CFG, model_dir, ws)
    text = str(err.value)
    for name in names:
        assert name in text


def test_missing_model_names_train_command(ws, tmp_path):
    with pytest.raises(DataError, match=re.escape("config.json")) as err:
        evaluate(CFG, tmp_path / "no-model", ws)
    assert "lmforge train" in err.value.fix


def test_malformed_sft_line_is_reported_with_line_number(model_dir, ws):
    path = ws.sft_dir / "test.jsonl"
    path.write_text('{"instruction": "x", "response": "y"}\n{"instruction": "no response"}\n')
    with pytest.raises(DataError, match=re.escape("test.jsonl:2")):
        evaluate(CFG.model_copy(update={"max_examples": 5}), model_dir, ws)


def test_empty_heldout_set_is_a_data_error(model_dir, ws):
    import pandas as pd

    pd.DataFrame({"text": []}, dtype=str).to_parquet(ws.curated_dir / "validation.parquet")
    with pytest.raises(DataError, match="no documents"):
        evaluate(CFG, model_dir, ws)


CHAT = {"id": "multi", "messages": [
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call-1", "name": "get_weather", "content": "18 degrees"},
    {"role": "assistant", "content": "It is 18 degrees."},
    {"role": "user", "content": "What does `len` do?"},
    {"role": "assistant", "content": "Return the number of items."},
]}


def test_a_chat_is_answered_at_its_last_assistant_turn_with_every_turn_before_as_prompt(model_dir):
    from lmforge.evaluation.scoring import answer_prompt, load_model
    from lmforge.model.chat import render_chat

    _, tokenizer = load_model(model_dir)
    prompt, reference, question = answer_prompt(tokenizer, CHAT)
    assert (reference, question) == ("Return the number of items.", "What does `len` do?")
    assert prompt == render_chat(tokenizer, CHAT["messages"][:-1], add_generation_prompt=True)
    assert "Answer in one line." in prompt and "18 degrees" in prompt  # system prompt and tool result kept
    # An answer that is only a tool call is scored against the call.
    calls = {"id": "call", "messages": CHAT["messages"][:3]}
    assert json.loads(answer_prompt(tokenizer, calls)[1]) == [{"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}]
    with pytest.raises(DataError, match="no assistant turn"):
        answer_prompt(tokenizer, {"id": "q", "messages": CHAT["messages"][:2]})


def test_evaluate_scores_multi_turn_chats(model_dir, ws):
    (ws.sft_dir / "test.jsonl").write_text(json.dumps(CHAT) + "\n")
    result = evaluate(CFG.model_copy(update={"frozen_set": "off"}), model_dir, ws)
    assert [(e["instruction"], e["reference"]) for e in result.examples] == [
        ("What does `len` do?", "Return the number of items.")]
