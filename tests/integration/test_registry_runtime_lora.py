"""A pipeline LoRA run, registered, loaded at run time from the registry (issue 19) on real MLflow (SQLite).

A tiny base is pretrained (one step), a LoRA run fine-tunes it (the train stage: ``adapter/``, ``base/`` and the merged
``model/``), and ``register_trained`` registers the merged model and logs the unmerged adapter beside it with the
record of its base. A server of the base (float32, CPU, one device slot) then loads ``models:/NAME@candidate``
through ``POST /v1/load_lora_adapter``: the adapter answers exactly the greedy tokens of the merged model served
alone, is listed by ``/v1/models`` and unload frees it. A server of the merged model refuses the same load (the
adapter would be applied twice) with a 400 naming ``lora_path``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import PROMPTS, openai_client, served
from test_serving_multi_lora import CFG, GREEDY

from lmforge.config import PipelineConfig
from lmforge.config.base import updated
from lmforge.config.model import ModelConfig
from lmforge.config.registry import RegistryConfig
from lmforge.config.training import LoggingConfig, PhaseConfig, PlacementConfig, TrainingConfig, TrainValidationConfig
from lmforge.core.workspace import Workspace
from lmforge.serving.engine import Engine
from lmforge.stages.register import register_trained
from lmforge.stages.train import train
from lmforge.tracking.adapter_base import BASE_FILE, TAG_ADAPTER, TAG_BASE, TAG_BASE_DIGEST
from lmforge.tracking.mlflow_tracker import mlflow_client

NAME = "tiny-lora"
URI = f"models:/{NAME}@candidate"
ADMIN = "admin-secret"
MODEL = ModelConfig(vocab_size=384, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                    max_seq_len=64)
PHASE = PhaseConfig(steps=4, learning_rate=1e-2, batch_size=4, seq_len=32, warmup_steps=1)
# The SFT examples' prompts (lmforge's template) need 64 tokens.
PRETRAIN = TrainingConfig(pretrain=PHASE, finetune=PHASE.model_copy(update={"seq_len": 64}), method="pretrain",
                          placement=PlacementConfig(use_ray=False), logging=LoggingConfig(every=1), cpu_threads=1,
                          validation=TrainValidationConfig(batches=1))
# One pretraining step makes the base (what it knows does not matter here); the LoRA run has none: it fine-tunes
# exactly that base (rank 8 fits the slots of max_rank 8).
BASE = PRETRAIN.model_copy(update={"pretrain": PHASE.model_copy(update={"steps": 1})})
LORA = BASE.model_copy(update={"method": "lora", "pretrain": PHASE.model_copy(update={"steps": 0}),
                               "lora": PRETRAIN.lora.model_copy(update={"r": 8, "alpha": 16, "dropout": 0.0})})
SERVE = updated(CFG, lora={"max_loras": 1, "max_rank": 8})


@pytest.fixture(autouse=True)
def _workspace_mlflow(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


@pytest.fixture(scope="module")
def registered(tokenized_workspace) -> dict[str, Any]:
    ws: Workspace = tokenized_workspace("registry-lora", MODEL)
    base = train(BASE, MODEL, ws, run_name="base")
    based = MODEL.model_copy(update={"base_model": str(base.model_dir)})
    lora = train(LORA, based, ws, run_name="lora")
    config = PipelineConfig(model=based, training=LORA, registry=RegistryConfig(model_name=NAME, experiment="lora"))
    version = register_trained(config, ws, lora.as_dict(), {"metrics": {"eval_loss": 1.0}}, None)
    client = mlflow_client(ws)
    client.set_registered_model_alias(NAME, "candidate", version["version"])
    return {"ws": ws, "base": base.model_dir, "merged": lora.model_dir, "version": version, "client": client}


def admin(url: str, route: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/{route}", json=body, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)


def greedy_text(url: str, model: str, prompt: str) -> str:
    out = openai_client(url).completions.create(model=model, prompt=prompt, max_tokens=GREEDY.max_tokens,
                                                temperature=0, extra_body={"ignore_eos": True})
    return out.choices[0].text


@pytest.fixture()
def home(registered, monkeypatch) -> Iterator[None]:
    """The server resolves models:/ URIs in the registry's workspace and has an admin key."""
    monkeypatch.setenv("LMFORGE_HOME", str(registered["ws"].home))
    monkeypatch.setenv("LMFORGE_ADMIN_KEY", ADMIN)
    yield


def test_register_logs_the_lora_runs_adapter_with_its_base(registered) -> None:
    client, version = registered["client"], registered["version"]
    tags = client.get_model_version(NAME, version["version"]).tags
    assert tags[TAG_ADAPTER] == "lora" and tags[TAG_BASE] == str(registered["base"]) and len(tags[TAG_BASE_DIGEST]) == 64
    logged = {Path(item.path).name for item in client.list_artifacts(version["run_id"], "adapter")}
    assert {"adapter_config.json", "adapter_model.safetensors", BASE_FILE} <= logged


def test_the_registered_adapter_answers_like_the_merged_model_and_unloads(registered, home) -> None:
    merged = Engine.load(registered["merged"], device="cpu", cfg=CFG)
    try:
        expected = [merged.tokenizer.decode(c.token_ids) for c in merged.generate(PROMPTS, GREEDY)]
    finally:
        merged.close()
    with served(registered["base"], SERVE) as (url, engine, _):
        base = [greedy_text(url, "tiny", prompt) for prompt in PROMPTS]
        loaded = admin(url, "load_lora_adapter", lora_name="tuned", lora_path=URI)
        assert loaded.status_code == 200, loaded.text
        assert [m.id for m in openai_client(url).models.list().data] == ["tiny", "tuned"]
        assert [greedy_text(url, "tuned", prompt) for prompt in PROMPTS] == expected
        assert expected != base  # the adapter changes the answers: the equality above is the adapter's
        gone = admin(url, "unload_lora_adapter", lora_name="tuned")
        assert gone.status_code == 200 and gone.json()["loaded"] is False
        assert [m.id for m in openai_client(url).models.list().data] == ["tiny"]
        assert engine.adapters == {} and engine.backend.lora.loaded == {}


def test_a_server_of_another_base_refuses_the_adapter_naming_lora_path(registered, home) -> None:
    # The merged model already holds the adapter: loading it there would apply it twice.
    with served(registered["merged"], SERVE) as (url, engine, _):
        refused = admin(url, "load_lora_adapter", lora_name="tuned", lora_path=URI)
        error = refused.json()["error"]
        assert refused.status_code == 400 and error["param"] == "lora_path", refused.text
        assert "another base" in error["message"] and str(registered["base"]) in error["message"]
        assert engine.adapters == {}
