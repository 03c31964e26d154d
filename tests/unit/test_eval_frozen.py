"""Frozen evaluation sets in one workspace: the same text for every candidate of a model name, whatever
the workspace's data version; a set edited after freezing is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from tiny_assets import build_tokenizer

from lmforge.config.evaluation import EvaluationConfig
from lmforge.core.errors import DataError
from lmforge.core.workspace import Workspace
from lmforge.evaluation.frozen import HELDOUT_FILE
from lmforge.stages.evaluate import evaluate

CFG = EvaluationConfig(max_batches=1, batch_size=4, block_size=32, max_examples=2, max_new_tokens=4)


def _new_data_version(ws: Workspace) -> None:
    """Different held-out documents and instructions, as a new collect + curate would leave."""
    pd.DataFrame({"text": [f"Completely different held-out text number {i}." for i in range(40)]}).to_parquet(
        ws.curated_dir / "validation.parquet", index=False)
    rows = [{"instruction": f"What is {i}?", "response": f"It is {i}."} for i in range(5)]
    (ws.sft_dir / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_two_runs_of_one_config_give_the_same_numbers_on_the_frozen_set(model_dir, ws):
    first = evaluate(CFG, model_dir, ws, model_name="frozen-demo")
    assert first.frozen_set["source"] == "new"
    _new_data_version(ws)
    second = evaluate(CFG, model_dir, ws, model_name="frozen-demo")

    assert second.frozen_set["source"] == "workspace"
    assert second.frozen_set["digest"] == first.frozen_set["digest"]
    assert second.metrics == first.metrics
    assert [e["instruction"] for e in second.examples] == [e["instruction"] for e in first.examples]
    assert second.tags == first.tags and second.tags["lmforge.eval.frozen_set"] == first.frozen_set["digest"]
    report = json.loads(Path(second.report_path).read_text())
    assert report["frozen_set"]["digest"] == first.frozen_set["digest"]
    # Another model name freezes its own set from the data as it is now.
    other = evaluate(CFG, model_dir, ws, model_name="other-name")
    assert other.frozen_set["source"] == "new" and other.frozen_set["digest"] != first.frozen_set["digest"]


def test_off_scores_the_current_data(model_dir, ws):
    off = CFG.model_copy(update={"frozen_set": "off"})
    before = evaluate(off, model_dir, ws, model_name="frozen-demo")
    _new_data_version(ws)
    after = evaluate(off, model_dir, ws, model_name="frozen-demo")
    assert before.frozen_set["source"] == after.frozen_set["source"] == "off"
    assert before.frozen_set["digest"] != after.frozen_set["digest"]
    assert before.metrics["eval_heldout_bytes"] != after.metrics["eval_heldout_bytes"]


def test_explicit_set_path_and_a_tampered_set(model_dir, ws, tmp_path):
    first = evaluate(CFG, model_dir, ws, model_name="frozen-demo")
    copy = tmp_path / "my-set"
    shutil.copytree(first.frozen_set["path"], copy)
    _new_data_version(ws)
    given = evaluate(CFG.model_copy(update={"frozen_set": str(copy)}), model_dir, ws)
    assert given.frozen_set["source"] == "path" and given.metrics == first.metrics

    with (copy / HELDOUT_FILE).open("a") as fh:
        fh.write(json.dumps({"text": "one more document"}) + "\n")
    with pytest.raises(DataError, match="changed after it was frozen"):
        evaluate(CFG.model_copy(update={"frozen_set": str(copy)}), model_dir, ws)
    with pytest.raises(DataError, match="not a frozen evaluation set"):
        evaluate(CFG.model_copy(update={"frozen_set": str(tmp_path)}), model_dir, ws)


def test_a_retrained_tokenizer_scores_the_same_bytes(model_dir, ws, tmp_path):
    first = evaluate(CFG, model_dir, ws, model_name="frozen-demo")
    retrained = tmp_path / "retrained"
    shutil.copytree(model_dir, retrained)
    # A smaller vocabulary cuts the same text into more tokens; the model's embedding still covers it.
    build_tokenizer(vocab_size=300).save_pretrained(retrained)
    second = evaluate(CFG, retrained, ws, model_name="frozen-demo")

    assert second.frozen_set["digest"] == first.frozen_set["digest"]
    assert second.frozen_set["tokenizer_matches"] is False and first.frozen_set["tokenizer_matches"] is True
    assert second.tags["lmforge.eval.tokenizer"] != first.tags["lmforge.eval.tokenizer"]
    assert second.metrics["eval_heldout_bytes"] == first.metrics["eval_heldout_bytes"]
    assert second.metrics["eval_heldout_tokens"] > first.metrics["eval_heldout_tokens"]
