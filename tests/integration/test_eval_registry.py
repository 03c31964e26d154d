"""The frozen evaluation set's durable home is the MLflow registered model (real MLflow on SQLite): a new
workspace with other data scores the same text, and a candidate with a retrained tokenizer is promoted
or kept on bits per byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from tiny_assets import build_model_dir, build_tokenizer, write_workspace_data

from lmforge.config import PipelineConfig
from lmforge.config.evaluation import EvaluationConfig
from lmforge.config.platform import PlatformConfig
from lmforge.config.registry import RegistryConfig
from lmforge.core.workspace import Workspace
from lmforge.evaluation.frozen_store import ARTIFACT_PATH, TAG_DIGEST, TAG_URI
from lmforge.stages.evaluate import evaluate
from lmforge.stages.promote import promote
from lmforge.stages.register import register_trained
from lmforge.tracking.mlflow_tracker import mlflow_client

CFG = EvaluationConfig(max_batches=1, batch_size=4, block_size=32, max_examples=2, max_new_tokens=2)
NAME = "frozen-registry"


@pytest.fixture(autouse=True)
def _no_global_mlflow(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


def _register(config: PipelineConfig, ws: Workspace, model_dir: Path, evaluated: dict, run: str) -> str:
    trained = {"model_dir": str(model_dir), "run_id": run, "metrics": {}, "params": {}, "history": []}
    return str(register_trained(config, ws, trained, evaluated, None)["version"])


def test_frozen_set_lives_on_the_registered_model_and_gates_on_bits_per_byte(tmp_path):
    platform = PlatformConfig(mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    config = PipelineConfig(registry=RegistryConfig(model_name=NAME, experiment="tests"), platform=platform)
    model_dir = build_model_dir(tmp_path / "model")

    first_ws = Workspace(tmp_path / "first").ensure()
    write_workspace_data(first_ws)
    first = evaluate(CFG, model_dir, first_ws, model_name=NAME, platform=platform)
    assert first.frozen_set["source"] == "new"
    v1 = _register(config, first_ws, model_dir, first.as_dict(), "run-1")

    client = mlflow_client(first_ws, platform)
    tags = client.get_registered_model(NAME).tags
    assert tags[TAG_DIGEST] == first.frozen_set["digest"] and tags[TAG_URI].endswith(ARTIFACT_PATH)
    run_id = client.get_model_version(NAME, v1).run_id
    logged = {a.path for a in client.list_artifacts(run_id, ARTIFACT_PATH)} | \
        {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert f"{ARTIFACT_PATH}/heldout.jsonl" in logged and f"evaluation/{Path(first.report_path).name}" in logged

    # A new workspace whose data moved on: the set comes from the registry, the numbers do not move.
    second_ws = Workspace(tmp_path / "second").ensure()
    write_workspace_data(second_ws)
    pd.DataFrame({"text": [f"Other held-out text {i}." for i in range(30)]}).to_parquet(
        second_ws.curated_dir / "validation.parquet", index=False)
    again = evaluate(CFG, model_dir, second_ws, model_name=NAME, platform=platform)
    assert again.frozen_set["source"] == "registry"
    assert again.frozen_set["digest"] == first.frozen_set["digest"] and again.metrics == first.metrics

    # A candidate whose tokenizer was retrained is compared in bits per byte, not perplexity.
    retrained = tmp_path / "retrained"
    shutil.copytree(model_dir, retrained)
    build_tokenizer(vocab_size=300).save_pretrained(retrained)
    candidate = evaluate(CFG, retrained, second_ws, model_name=NAME, platform=platform)
    v2 = _register(config, second_ws, retrained, candidate.as_dict(), "run-2")
    assert promote(config.registry, platform, second_ws, v1).promoted
    decision = promote(config.registry, platform, second_ws, v2)
    assert decision.metric == "eval_bits_per_byte" and "tokenizers differ" in decision.reason
    assert decision.candidate_value == pytest.approx(candidate.metrics["eval_bits_per_byte"])
    assert decision.champion_value == pytest.approx(first.metrics["eval_bits_per_byte"])
    assert decision.promoted == (candidate.metrics["eval_bits_per_byte"] < first.metrics["eval_bits_per_byte"] * 0.99)

    # Same tokenizer as the champion, same set: the configured metric decides.
    v3 = _register(config, second_ws, retrained if decision.promoted else model_dir,
                   (candidate if decision.promoted else again).as_dict(), "run-3")
    same = promote(config.registry, platform, second_ws, v3)
    assert same.metric == "eval_perplexity" and "tokenizers differ" not in same.reason
    assert not same.promoted  # equal scores never clear the margin
    # The set on the name never moves after the first registration.
    assert client.get_registered_model(NAME).tags[TAG_DIGEST] == first.frozen_set["digest"]
