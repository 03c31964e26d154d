"""The stages after training on an object-store workspace (moto's S3 on loopback, found through
AWS_ENDPOINT_URL): a tiny trained run is put into the bucket as the train stage leaves it (committed
``runs/<id>/`` with ``model/`` inside, ``tokenizer/``, the ``train`` hand-off under ``state/``), then `lmforge
evaluate` and `lmforge promote` run as a user runs them, from a directory that is not the workspace.
Every output is a committed object in the bucket, the registered version's files are under the
MLflow artifacts prefix (``<LMFORGE_HOME>/mlflow-artifacts``, the default for such a workspace), and
nothing of the workspace is written on local disk outside the cache but MLflow's SQLite file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import BIN
from fixtures.collect.s3 import SECRET, bucket_keys, client, s3_server
from tiny_assets import write_workspace_data

from lmforge.core.storage import MARKER, open_store
from lmforge.core.workspace import Workspace

BUCKET = "lmforge-registry"
PREFIX = "team/ws"
RUN = "tiny-20260101-000000-abcdef"
CONFIG = {"evaluation": {"max_batches": 1, "batch_size": 4, "block_size": 32, "max_examples": 2, "max_new_tokens": 4},
          "registry": {"model_name": "s3-tiny", "experiment": "s3-tiny"}}


@pytest.fixture(scope="module")
def s3():
    with s3_server() as endpoint:
        s3c = client(endpoint)
        s3c.create_bucket(Bucket=BUCKET)
        yield endpoint, s3c


def _lmforge(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lmforge"), *args], env={**os.environ, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _keys(s3c, prefix: str) -> list[str]:
    return bucket_keys(s3c, BUCKET, prefix)


def _stage_trained_run(ws: Workspace, model_dir: Path, scratch: Path) -> None:
    """What collect/curate and train leave on the store: the held-out data, the tokenizer, the model
    (committed directories) and the train hand-off naming the model as the train stage does."""
    store = open_store(ws)
    local = Workspace(scratch)
    write_workspace_data(local)
    for where, source in ((ws.curated_dir, local.curated_dir), (ws.sft_dir, local.sft_dir),
                          (ws.tokenizer_dir, model_dir)):
        with store.atomic_dir(where) as out:
            shutil.copytree(source, out, dirs_exist_ok=True)
    with store.atomic_dir(ws.runs_dir / RUN) as out:  # one committed run directory, the model inside
        shutil.copytree(model_dir, out / "model")
    ws.write_state("train", {"run_id": RUN, "model_dir": str(ws.runs_dir / RUN / "model"), "adapter_dir": None,
                             "history": [{"step": 1, "loss": 5.0}], "metrics": {"train_loss": 5.0},
                             "params": {"training.method": "pretrain"}, "mlflow_run_id": None})


@pytest.mark.slow  # a staged run, evaluate and promote on moto S3: about 50 s (lmforge run on S3 covers them too)
def test_evaluate_and_promote_on_s3_keep_outputs_and_the_registered_model_in_the_bucket(
        s3, model_dir, tmp_path, monkeypatch):
    endpoint, s3c = s3
    cwd, cache = tmp_path / "elsewhere", tmp_path / "cache"
    cwd.mkdir()
    url = f"s3://{BUCKET}/{PREFIX}"
    env = {"LMFORGE_HOME": url, "LMFORGE_CACHE": str(cache), "AWS_ENDPOINT_URL": endpoint}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    ws = Workspace.from_env(url)
    _stage_trained_run(ws, model_dir, tmp_path / "staging")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))

    evaluated = _lmforge(["evaluate", str(config), "--json"], cwd, env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    promoted = _lmforge(["promote", str(config), "--json"], cwd, env)
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    decision = json.loads(promoted.stdout.strip().splitlines()[-1])
    assert decision["decision"] == "promoted" and decision["version"] == "1"
    assert SECRET not in evaluated.stdout + evaluated.stderr + promoted.stdout + promoted.stderr

    keys = _keys(s3c, PREFIX)
    state = {name: json.loads(s3c.get_object(Bucket=BUCKET, Key=f"{PREFIX}/state/{name}.json")["Body"].read())
             for name in ("evaluate", "register", "promote")}
    report = state["evaluate"]["report_path"]
    assert report.startswith(f"{url}/eval/") and report.removeprefix(f"{url}/") in keys
    assert state["evaluate"]["model_dir"] == str(ws.runs_dir / RUN / "model")  # as the hand-off named it
    digest = state["evaluate"]["frozen_set"]["digest"]
    assert f"eval/frozen/{digest[:16]}/{MARKER}" in keys and "eval/frozen/names/s3-tiny.json" in keys
    assert state["register"]["version"] == "1" and state["promote"]["champion_version"] == "1"
    assert not any(".tmp" in k for k in keys)

    # The registered version's files are in the bucket, under the MLflow artifacts prefix, and MLflow
    # resolves models:/NAME@champion to them (what `lmforge serve` downloads, from any machine).
    source = state["register"]["source"]
    assert source.startswith(f"{url}/mlflow-artifacts/"), source
    stored = source.removeprefix(f"{url}/")
    assert {f"{stored}/model.safetensors", f"{stored}/config.json"} <= set(keys)
    assert any(k.startswith("mlflow-artifacts/") and k.endswith("evaluation/" + Path(report).name) for k in keys)
    from lmforge.tracking.model_uris import resolve_model

    served, name, version = resolve_model("models:/s3-tiny@champion", ws)
    assert (name, version) == ("s3-tiny", "1") and (served / "model.safetensors").is_file()

    # Locally: nothing in the working directory; the workspace's side under the cache holds MLflow's
    # SQLite file (this machine's tracking store) and the serving download above, no stage output.
    assert list(cwd.iterdir()) == []
    side = ws.home
    assert side.is_relative_to(cache)
    left = {p.relative_to(side).parts[0] for p in side.rglob("*") if p.is_file()}
    assert left <= {"mlflow", "serving"}, left
    assert not any(p.suffix in (".json", ".safetensors") for p in (side / "mlflow").rglob("*"))


@pytest.mark.slow  # an MLflow server start and a registration through it: about 40 s on a busy machine
def test_mlflow_server_of_lmforge_ui_keeps_versions_in_the_bucket_and_serves_them(s3, model_dir, tmp_path, monkeypatch):
    """The MLflow server as `lmforge ui` starts it with platform.mlflow_artifacts on the store: a version
    registered through it lands in the bucket, and a client without any store credentials downloads
    it through the server (what another machine does)."""
    from conftest import free_port, server_process

    from lmforge.config import PipelineConfig
    from lmforge.config.registry import RegistryConfig
    from lmforge.stages.register import register
    from lmforge.tracking.model_uris import resolve_model
    from lmforge.ui import artifact_flags

    endpoint, s3c = s3
    ws = Workspace(tmp_path / "home").ensure()
    config = PipelineConfig.model_validate({"platform": {"mlflow_artifacts": f"s3://{BUCKET}/mlflow"}})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
               *artifact_flags(ws, config), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    with server_process(command, f"{url}/health", tmp_path / "server.log",
                        env={**os.environ, "AWS_ENDPOINT_URL": endpoint}, timeout=120):
        registered = register(RegistryConfig(model_name="served-tiny", experiment="served-tiny"), config.platform, ws,
                              model_dir=model_dir, params={}, metrics={"eval_perplexity": 9.0}, history=[],
                              dataset_inputs=[], tags={})
        assert registered.source.startswith("mlflow-artifacts:/"), registered.source  # proxied, not s3:// itself
        keys = _keys(s3c, "mlflow")
        assert any(k.endswith("/model.safetensors") for k in keys) and any(k.endswith("/config.json") for k in keys)
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
            monkeypatch.delenv(key, raising=False)
        served, _, version = resolve_model("models:/served-tiny/1", ws)
        assert version == "1" and (served / "model.safetensors").is_file()
