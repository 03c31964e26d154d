"""Retraining from the champion against real MLflow (SQLite in a workspace): ``model.base_model:
models:/NAME@champion`` continues from that registered version's weights, tokenizer and chat template,
records which version it was, and refuses what it cannot continue with cause and fix.

The registry lives in one workspace (``home``); the retraining runs in another (``fresh``) that has
the data but no tokenizer, and reaches the registry through ``platform.mlflow_tracking_uri``, as a
second machine would. A run of zero steps saves exactly the weights it started from, which is how
"starts from the champion's weights" is observed without a tolerance.
"""

from __future__ import annotations

import time

import pytest
import torch
from helpers import write_corpus
from safetensors.torch import load_file
from tiny_assets import build_tokenizer

from lmforge.config.model import ModelConfig
from lmforge.config.pipeline import PipelineConfig
from lmforge.config.platform import PlatformConfig
from lmforge.config.registry import RegistryConfig
from lmforge.config.tokenize import TokenizeConfig
from lmforge.config.training import LoggingConfig, PhaseConfig, PlacementConfig, TrainingConfig, TrainValidationConfig
from lmforge.core.errors import ConfigError, RegistryError
from lmforge.core.workspace import Workspace
from lmforge.evaluation.frozen import tokenizer_fingerprint
from lmforge.model.chat import template_label
from lmforge.stages.base_model import TAG_URI, TAG_VERSION, continued, resolve_base
from lmforge.stages.register import register
from lmforge.stages.tokenize import tokenize
from lmforge.stages.train import train
from lmforge.tokenizer.build import load_tokenizer
from lmforge.tracking.mlflow_tracker import mlflow_client

NAME = "retrain-tiny"
URI = f"models:/{NAME}@champion"
# chatml for the champion; the retraining config keeps the default (lmforge): the champion's own wins.
CHAMPION_MODEL = ModelConfig(vocab_size=384, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                             intermediate_size=64, max_seq_len=64, chat_template="chatml")
PHASE = PhaseConfig(steps=4, learning_rate=1e-2, batch_size=4, seq_len=32, warmup_steps=1)
TRAINING = TrainingConfig(pretrain=PHASE, finetune=PHASE, method="pretrain", placement=PlacementConfig(use_ray=False),
                          logging=LoggingConfig(every=1), cpu_threads=1, validation=TrainValidationConfig(batches=1))
NO_STEPS = TRAINING.model_copy(update={"pretrain": PHASE.model_copy(update={"steps": 0})})


@pytest.fixture(autouse=True)
def _workspace_mlflow(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


@pytest.fixture(scope="module")
def registry(tokenized_workspace):
    """A workspace whose registry holds NAME: version 1 (trained in full, alias champion), version 2
    (a LoRA fine-tune of it: registered merged, alias lora) and version 3 (a prefix-tuning adapter beside
    its base weights, unmergeable, alias prefix)."""
    home = tokenized_workspace("champion-home", CHAMPION_MODEL)
    platform = PlatformConfig(mlflow_tracking_uri=home.mlflow_tracking_uri, mlflow_system_metrics_interval_s=0)
    client = mlflow_client(home, platform)
    champion = train(TRAINING, CHAMPION_MODEL, home, run_name="champion")
    based = CHAMPION_MODEL.model_copy(update={"base_model": str(champion.model_dir)})
    lora = train(TRAINING.model_copy(update={"pretrain": NO_STEPS.pretrain, "method": "lora"}), based, home,
                 run_name="lora")
    prefix = train(TRAINING.model_copy(update={"pretrain": NO_STEPS.pretrain, "method": "prefix"}), based, home,
                   run_name="prefix")
    for result, alias in ((champion, "champion"), (lora, "lora"), (prefix, "prefix")):
        version = register(RegistryConfig(model_name=NAME, experiment="champions"), platform, home,
                           model_dir=result.model_dir, params={}, metrics={"eval_loss": 1.0}, history=[],
                           dataset_inputs=[], tags={})
        client.set_registered_model_alias(NAME, alias, version.version)
    return {"home": home, "platform": platform, "client": client, "champion": champion, "lora": lora,
            "prefix": prefix}


@pytest.fixture()
def fresh(tmp_path):
    """A workspace with data and no tokenizer: whatever tokenizer it gets comes from the base."""
    ws = Workspace(tmp_path / "fresh")
    write_corpus(ws)
    return ws


def _weights(model_dir) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_continues_from_the_champion_with_its_tokenizer_template_and_lineage(registry, fresh):
    platform, client = registry["platform"], registry["client"]
    model = ModelConfig(base_model=URI)  # chat_template left at its default, lmforge
    tokenize(TokenizeConfig(build_datasets=False), model, NO_STEPS, fresh, platform=platform)
    copied, theirs = load_tokenizer(fresh.tokenizer_dir), load_tokenizer(registry["champion"].model_dir)
    assert tokenizer_fingerprint(copied) == tokenizer_fingerprint(theirs)  # copied, not a new BPE
    assert template_label(copied) == "chatml"

    result = train(NO_STEPS, model, fresh, experiment="retrain", platform=platform)
    assert _same(_weights(result.model_dir), _weights(registry["champion"].model_dir))
    assert template_label(load_tokenizer(result.model_dir)) == "chatml"

    run = client.get_run(result.mlflow_run_id)
    assert run.data.tags[TAG_URI] == URI and run.data.tags[TAG_VERSION] == "1"
    # The config as written goes on record, never the workspace path it was downloaded to.
    assert run.data.params["model.base_model"] == URI
    assert result.params["lmforge.base_model_version"] == "1"

    # Real steps move the weights away from the champion's (the run trains them, not a fresh model).
    stepped = train(TRAINING, model, fresh, platform=platform)
    assert not _same(_weights(stepped.model_dir), _weights(registry["champion"].model_dir))
    # Its first batch already scores far better than the random start the champion itself began from
    # (about ln(384) = 5.95; same data and seed, deterministic on one CPU thread).
    assert stepped.history[0]["loss"] < registry["champion"].history[0]["loss"] - 0.3


def test_a_lora_champion_is_continued_from_its_merged_weights(registry, fresh):
    platform = registry["platform"]
    model = ModelConfig(base_model=f"models:/{NAME}@lora")
    tokenize(TokenizeConfig(build_datasets=False), model, NO_STEPS, fresh, platform=platform)
    result = train(NO_STEPS, model, fresh, platform=platform)
    merged = _weights(registry["lora"].model_dir)
    assert _same(_weights(result.model_dir), merged)
    assert not _same(merged, _weights(registry["champion"].model_dir))  # the adapter is in them


def test_an_unmergeable_adapter_champion_keeps_training_its_adapter(registry, fresh):
    platform = registry["platform"]
    model = ModelConfig(base_model=f"models:/{NAME}@prefix")
    tokenize(TokenizeConfig(build_datasets=False), model, NO_STEPS, fresh, platform=platform)
    # One step at a vanishing learning rate: what is saved is what the adapter started from. Prefix tuning
    # is saved as the prefixes its MLP made (peft keeps no MLP), so P-tuning v2 trains them on directly.
    still = PHASE.model_copy(update={"steps": 1, "learning_rate": 1e-12, "warmup_steps": 0})
    prefix = NO_STEPS.model_copy(update={"method": "ptuning_v2", "finetune": still})
    result = train(prefix, model, fresh, platform=platform)
    champion = registry["prefix"].model_dir
    started = load_file(str(result.model_dir / "adapter" / "adapter_model.safetensors"))
    theirs = load_file(str(champion / "adapter" / "adapter_model.safetensors"))
    assert started.keys() == theirs.keys() and all(torch.allclose(started[k], theirs[k], atol=1e-6) for k in theirs)
    assert _same(_weights(result.model_dir), _weights(champion))  # the same frozen base under it

    # Any other method would train the champion's base without the adapter that makes it the champion.
    for method in ("lora", "prefix", "pretrain"):
        with pytest.raises(ConfigError, match="unmergeable adapter") as info:
            train(prefix.model_copy(update={"method": method}), model, fresh, platform=platform)
        assert "training.method: ptuning_v2" in info.value.fix
    # The same method with other settings cannot take the saved tensors: refused, not silently fresh.
    wider = prefix.model_copy(update={"prompt_learning": prefix.prompt_learning.model_copy(
        update={"num_virtual_tokens": prefix.prompt_learning.num_virtual_tokens + 2})})
    with pytest.raises(ConfigError, match="does not fit"):
        train(wider, model, fresh, platform=platform)


def test_what_cannot_be_continued_is_refused_with_the_fix(registry, fresh):
    platform = registry["platform"]
    with pytest.raises(RegistryError, match="no alias 'nope'") as info:
        resolve_base(ModelConfig(base_model=f"models:/{NAME}@nope"), fresh, platform)
    assert "lmforge promote" in info.value.fix
    with pytest.raises(RegistryError, match="no version '9'"):
        resolve_base(ModelConfig(base_model=f"models:/{NAME}/9"), fresh, platform)
    with pytest.raises(RegistryError, match="no registered model 'other'"):
        resolve_base(ModelConfig(base_model="models:/other@champion"), fresh, platform)

    started = time.monotonic()
    with pytest.raises(RegistryError, match="cannot reach the MLflow registry") as info:
        resolve_base(ModelConfig(base_model=URI), fresh, PlatformConfig(mlflow_tracking_uri="http://127.0.0.1:9"))
    assert time.monotonic() - started < 15 and "mlflow_tracking_uri" in info.value.fix

    # A workspace tokenizer that is not the champion's (an earlier run's own BPE): training refuses it
    # instead of feeding the champion ids its embeddings never learned.
    build_tokenizer().save_pretrained(fresh.tokenizer_dir)
    with pytest.raises(ConfigError, match="not the tokenizer of base_model") as info:
        train(NO_STEPS, ModelConfig(base_model=URI), fresh, platform=platform)
    assert "lmforge tokenize" in info.value.fix


def test_scheduled_runs_continue_from_the_champion_when_one_exists(registry):
    home, platform = registry["home"], registry["platform"]
    config = PipelineConfig.model_validate({"registry": {"model_name": NAME}, "platform": platform.model_dump()})
    assert continued(config, "auto", True, home).model.base_model == URI
    assert continued(config, "auto", False, home) is config  # `lmforge run` trains as the config says
    assert continued(config, "scratch", True, home) is config
    given = config.model_copy(update={"model": ModelConfig(base_model="/some/dir")})
    assert continued(given, "auto", True, home).model.base_model == "/some/dir"
    assert continued(given, "champion", False, home).model.base_model == URI
    nameless = PipelineConfig.model_validate({"registry": {"model_name": "never-registered"},
                                              "platform": platform.model_dump()})
    assert continued(nameless, "auto", True, home) is nameless
    with pytest.raises(RegistryError, match="no registered version holds the alias"):
        continued(nameless, "champion", True, home)


def test_cli_model_info_and_train_read_the_champion(registry, fresh, tmp_path, capsys):
    import json

    from lmforge.cli import main

    config = tmp_path / "retrain.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "model": {"base_model": URI}, "training": NO_STEPS.model_dump(mode="json"),
        "platform": registry["platform"].model_dump(mode="json"), "registry": {"experiment": "retrain-cli"}}))
    assert main(["--home", str(fresh.home), "model", "info", str(config), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (info["hidden"], info["layers"]) == (CHAMPION_MODEL.hidden_size, CHAMPION_MODEL.num_layers)

    # No tokenizer in the workspace: `lmforge train` copies the champion's instead of training one.
    assert main(["--home", str(fresh.home), "train", str(config), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["params"]["lmforge.base_model_uri"] == URI
    assert template_label(load_tokenizer(fresh.tokenizer_dir)) == "chatml"
    assert _same(_weights(fresh.runs_dir / summary["run_id"] / "model"), _weights(registry["champion"].model_dir))
