"""Register, promote and resolve against real MLflow on SQLite in a temporary workspace.

Each test uses its own registered-model name so tests stay independent while sharing one
database (creating an MLflow database costs seconds).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow.entities import LoggedModelStatus
from tiny_assets import build_model_dir

from lmforge.config.platform import PlatformConfig
from lmforge.config.registry import PolicyConfig, RegistryConfig
from lmforge.core.errors import DataError, RegistryError
from lmforge.core.workspace import Workspace
from lmforge.stages.promote import promote
from lmforge.stages.register import register
from lmforge.tracking.mlflow_tracker import list_models, mlflow_client, mlflow_uris
from lmforge.tracking.model_uris import resolve_model

# 600 steps x 2 metrics = 1200 values: the history must cross MLflow's 1000-per-batch limit.
HISTORY = [{"step": s, "loss": 6.0 - s / 200, "lr": 1e-3, "phase": "pretrain"} for s in range(600)]
LINEAGE = {"config_hash": "c0ffee", "flow_run_id": "flow-123", "code_version": "abc1234", "data.train": "d1g3st"}
DATASETS = [
    {"name": "curated-train", "digest": "d1g3st", "path": "/data/curated/train.parquet", "rows": 120},
    {"name": "sft-train", "digest": "5ft0", "path": "/data/sft/train.jsonl", "rows": 40, "context": "fine-tuning"},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("registry") / "home").ensure()


@pytest.fixture(autouse=True)
def _no_global_mlflow(monkeypatch):
    # The workspace default must be what every test uses, whatever the developer's shell exports.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)


def _register(ws, model_dir, name, perplexity, history=None):
    cfg = RegistryConfig(model_name=name, experiment="tests")
    return register(
        cfg,
        PlatformConfig(),
        ws,
        model_dir=model_dir,
        params={"model": {"hidden_size": 32, "num_layers": 2}, "training": {"lr": 3e-3, "targets": ["q", "v"]}},
        metrics={"eval_perplexity": perplexity, "eval_loss": 5.0},
        history=history if history is not None else HISTORY[:3],
        dataset_inputs=DATASETS,
        tags=LINEAGE,
    )


def test_mlflow_uris_precedence(ws, monkeypatch):
    assert mlflow_uris(ws, PlatformConfig()) == (ws.mlflow_tracking_uri, ws.mlflow_tracking_uri)
    assert ws.mlflow_tracking_uri.startswith("sqlite:///") and str(ws.home) in ws.mlflow_tracking_uri
    platform = PlatformConfig(mlflow_tracking_uri="http://mlflow:5000")
    assert mlflow_uris(ws, platform)[0] == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert mlflow_uris(ws, platform) == ("http://env:5000", "http://env:5000")


def test_register_records_run_lineage_and_version(ws, model_dir):
    registered = _register(ws, model_dir, "reg", 300.0, history=HISTORY)

    assert registered.version == "1"
    assert registered.model_uri == "models:/reg/1"
    client = mlflow_client(ws)
    run = client.get_run(registered.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.hidden_size"] == "32"
    assert run.data.params["training.targets"] == '["q", "v"]'
    assert run.data.metrics["eval_perplexity"] == 300.0
    assert len(client.get_metric_history(registered.run_id, "loss")) == 600
    assert "phase" not in run.data.metrics
    assert {k: run.data.tags[k] for k in LINEAGE} == LINEAGE
    digests = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert digests == {"curated-train": "d1g3st", "sft-train": "5ft0"}

    version = client.get_model_version("reg", "1")
    assert version.run_id == registered.run_id
    assert {k: version.tags[k] for k in LINEAGE} == LINEAGE
    logged = client.get_logged_model(registered.model_id)
    assert logged.status == LoggedModelStatus.READY
    assert {m.key: m.value for m in logged.metrics}["eval_perplexity"] == 300.0
    artifacts = {a.path for a in client.list_logged_model_artifacts(registered.model_id)}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= artifacts
    assert ws.read_state("register")["model_uri"] == "models:/reg/1"
    # The experiment's artifacts live inside the workspace, not in ./mlruns.
    assert registered.source.startswith(ws.mlflow_artifacts_uri)


def test_promotion_policy(ws, model_dir):
    cfg = RegistryConfig(model_name="promo", experiment="tests", policy=PolicyConfig(margin=0.05))
    versions = [_register(ws, model_dir, "promo", ppl).version for ppl in (100.0, 120.0, 98.0, 90.0)]

    first = promote(cfg, None, ws, versions[0])
    assert first.promoted and "first version" in first.reason and first.champion_version == "1"

    worse = promote(cfg, None, ws, versions[1])
    assert not worse.promoted and worse.champion_version == "1"
    assert "120" in worse.reason and "100" in worse.reason and "kept v1" in worse.reason
    assert (worse.candidate_value, worse.champion_value) == (120.0, 100.0)

    within_margin = promote(cfg, None, ws, versions[2])  # 2% better, 5% needed
    assert not within_margin.promoted and "+2.00%" in within_margin.reason

    better = promote(cfg, None, ws, versions[3])  # 10% better
    assert better.promoted and better.champion_version == "4" and better.previous_champion_version == "1"

    client = mlflow_client(ws)
    assert str(client.get_model_version_by_alias("promo", "champion").version) == "4"
    tags = client.get_model_version("promo", "2").tags
    assert tags["lmforge.promotion.promoted"] == "false" and "kept v1" in tags["lmforge.promotion.reason"]
    assert ws.read_state("promote")["champion_version"] == "4"


def test_resolve_champion_loads_and_generates(ws, model_dir, monkeypatch):
    import mlflow
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    version = _register(ws, model_dir, "serve", 50.0).version
    promote(RegistryConfig(model_name="serve", experiment="tests"), None, ws, version)

    path, name, resolved = resolve_model("models:/serve@champion", ws)
    assert (name, resolved) == ("serve", "1")
    assert path == ws.serving_dir / "models" / "serve-v1"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    ids = tokenizer("### Instruction:\nhi\n\n### Response:\n", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4

    assert resolve_model("models:/serve/1", ws)[0] == path  # same version, reused download
    assert resolve_model(str(model_dir), ws) == (model_dir.resolve(), "tiny", "local")

    # MLflow's own resolver finds the same files through the registry.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ws.mlflow_tracking_uri)
    plain = mlflow.artifacts.download_artifacts("models:/serve@champion", dst_path=str(ws.home / "plain"))
    assert {"config.json", "model.safetensors"} <= {p.name for p in Path(plain).iterdir()}


def test_unknown_model_or_alias_is_a_registry_error(ws, model_dir):
    _register(ws, model_dir, "known", 10.0)
    with pytest.raises(RegistryError) as err:
        resolve_model("models:/known@champion", ws)
    assert "no alias 'champion'" in err.value.cause and "versions: [1]" in err.value.cause
    with pytest.raises(RegistryError) as err:
        resolve_model("models:/missing@champion", ws)
    assert "known" in err.value.cause and "lmforge run" in err.value.fix
    with pytest.raises(RegistryError, match="no version '9'"):
        resolve_model("models:/known/9", ws)
    with pytest.raises(RegistryError, match="neither"):
        resolve_model(str(ws.home / "nowhere"), ws)
    with pytest.raises(RegistryError, match="no registered model 'missing'"):
        promote(RegistryConfig(model_name="missing", experiment="tests"), None, ws, "1")
    with pytest.raises(RegistryError, match="no metric 'eval_bleu'"):
        promote(RegistryConfig(model_name="known", experiment="tests", policy=PolicyConfig(metric="eval_bleu")), None, ws, "1")


@pytest.mark.parametrize("broken", ["no-weights", "pickle"])
def test_failed_register_leaves_no_version(ws, model_dir, tmp_path, broken):
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    if broken == "no-weights":
        (bad / "model.safetensors").unlink()
    else:
        (bad / "pytorch_model.bin").write_bytes(b"not really a pickle")
    name = f"broken-{broken}"
    with pytest.raises(DataError):
        _register(ws, bad, name, 1.0)

    client = mlflow_client(ws)
    assert client.search_model_versions(f"name='{name}'") == []
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'FAILED'")
    assert any("DataError" in r.data.tags.get("lmforge.error", "") and bad.name in r.data.tags["lmforge.error"]
               for r in runs)


def test_two_workspaces_never_mix(ws, model_dir, tmp_path):
    other = Workspace(tmp_path / "other").ensure()
    assert _register(other, model_dir, "isolated", 1.0).version == "1"
    assert [m["name"] for m in list_models(other)] == ["isolated"]
    assert "isolated" not in [m["name"] for m in list_models(ws)]


def test_list_models_reports_aliases_and_metric(ws, model_dir):
    version = _register(ws, model_dir, "listed", 42.0).version
    promote(RegistryConfig(model_name="listed", experiment="tests"), None, ws, version)
    listed = {m["name"]: m for m in list_models(ws)}["listed"]
    assert listed["aliases"] == {"champion": "1"} and listed["latest_version"] == "1"
    assert listed["versions"][0]["value"] == 42.0 and listed["versions"][0]["aliases"] == ["champion"]
