"""Live tracking against real MLflow (SQLite in the workspace): the run opens when training starts,
its metrics are readable through MlflowClient while training runs, system metrics land on it, a
failed training leaves a FAILED run with the error, and register links the version to that run.

Mid-run visibility is observed deterministically: the progress callback (called on the training
thread after a row went to the MLflow sink) holds training at a chosen step until the test has
read the row back from MLflow, so "before training ends" is a fact, not a timing guess.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from lmforge.config import PipelineConfig
from lmforge.config.model import ModelConfig
from lmforge.config.platform import PlatformConfig
from lmforge.config.registry import RegistryConfig
from lmforge.config.training import LoggingConfig, PhaseConfig, PlacementConfig, TrainingConfig, TrainValidationConfig
from lmforge.core.errors import DataError, TrainingDiverged
from lmforge.core.workspace import Workspace
from lmforge.stages.register import register_trained
from lmforge.stages.train import record_failure, train
from lmforge.tracking.live import TRAIN_RUN_TAG, LiveRun
from lmforge.tracking.mlflow_tracker import mlflow_client

MODEL = ModelConfig(vocab_size=384, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=64, max_seq_len=64)
TRAINING = TrainingConfig(
    pretrain=PhaseConfig(steps=12, learning_rate=1e-2, batch_size=4, seq_len=32, warmup_steps=2),
    method="pretrain", placement=PlacementConfig(use_ray=False), logging=LoggingConfig(every=1), cpu_threads=1,
    validation=TrainValidationConfig(every=4, batches=1),
)
# Small intervals so a short test sees system metrics and flushed batches.
PLATFORM = PlatformConfig(mlflow_system_metrics_interval_s=0.1, mlflow_flush_every_s=0.1)
HOLD_AT = 6
DEADLINE_S = 60


@pytest.fixture(scope="module")
def ws(tokenized_workspace):
    return tokenized_workspace("live", MODEL)


@pytest.fixture(autouse=True)
def _workspace_mlflow(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)


def _runs(ws: Workspace, experiment: str) -> list:
    client = mlflow_client(ws, PLATFORM)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def _until(condition, what: str):
    """Poll MLflow until ``condition()`` is truthy (the sink writes from its own thread)."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"MLflow never showed {what} within {DEADLINE_S} s")


def test_metrics_are_readable_in_mlflow_while_training_runs_and_register_links_that_run(ws):
    held, release = threading.Event(), threading.Event()
    rows: list[dict] = []

    def progress(row: dict) -> None:
        rows.append(row)
        if row["step"] == HOLD_AT:
            held.set()
            assert release.wait(DEADLINE_S), "the test never released training"

    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = train(TRAINING, MODEL, ws, run_name="live", progress=progress,
                                      experiment="live", platform=PLATFORM)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread, which raises it
            outcome["error"] = exc
            held.set()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert held.wait(DEADLINE_S) and "error" not in outcome, outcome.get("error")
        client = mlflow_client(ws, PLATFORM)
        (run,) = _runs(ws, "live")
        run_id = run.info.run_id
        losses = _until(lambda: client.get_metric_history(run_id, "loss"), "the loss")
        _until(lambda: any(k.startswith("system/") for k in client.get_run(run_id).data.metrics),
               "system metrics")
        during = client.get_run(run_id)
        assert during.info.status == "RUNNING" and thread.is_alive()
        assert {m.step for m in losses} <= set(range(1, HOLD_AT + 1))  # nothing past the step training holds at
        assert during.data.params["training.pretrain.steps"] == "12"  # params from the start
        assert during.data.tags[TRAIN_RUN_TAG].startswith("live-")
    finally:
        release.set()
        thread.join(DEADLINE_S)
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]

    assert result.mlflow_run_id == run_id
    assert ws.read_state("train")["mlflow_run_id"] == run_id
    after = client.get_run(run_id)
    assert after.info.status == "FINISHED"
    assert [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)] == \
        [(r["step"], pytest.approx(r["loss"])) for r in result.history]
    val = client.get_metric_history(run_id, "pretrain_val_loss")  # before step 1, every 4 steps, at the end
    assert sorted(m.step for m in val) == [0, 4, 8, 12, 12]  # the end's value twice: its series and the final
    assert after.data.params["params_total"] == str(result.params["params_total"])  # learned during training
    assert any(k.startswith("system/cpu") for k in after.data.metrics)
    assert rows == result.history  # progress still gets history rows only

    config = PipelineConfig(model=MODEL, training=TRAINING, platform=PLATFORM,
                            registry=RegistryConfig(model_name="live-model", experiment="live"))
    registered = register_trained(config, ws, ws.read_state("train"), {"metrics": {"eval_perplexity": 42.0}}, None)
    assert registered["run_id"] == run_id
    assert client.get_model_version("live-model", registered["version"]).run_id == run_id
    assert len(_runs(ws, "live")) == 1  # no second run
    final = client.get_run(run_id)
    assert final.info.status == "FINISHED" and final.data.metrics["eval_perplexity"] == 42.0
    assert "config_hash" in final.data.params
    assert len(client.get_metric_history(run_id, "loss")) == len(result.history)  # not logged twice


def test_a_failing_train_stage_leaves_a_failed_run_with_the_error(ws, tmp_path):
    # Before any step: the inputs check (no tokenizer in an empty workspace). Its runs go to the
    # module workspace's MLflow (a new SQLite database costs seconds).
    empty = Workspace(tmp_path / "empty")
    shared = PLATFORM.model_copy(update={"mlflow_tracking_uri": ws.mlflow_tracking_uri})
    with pytest.raises(DataError):
        train(TRAINING, MODEL, empty, run_name="nothing", experiment="failing", platform=shared)
    (run,) = _runs(ws, "failing")
    assert run.info.status == "FAILED" and run.data.tags["lmforge.failed_stage"] == "train"
    assert run.data.tags["lmforge.error"].startswith("DataError: no tokenizer")
    assert "tokenize" in run.data.tags["lmforge.error_fix"]

    # During training: a diverging loss, after some steps were already streamed.
    absurd = TRAINING.model_copy(update={"pretrain": TRAINING.pretrain.model_copy(
        update={"learning_rate": 1e6, "warmup_steps": 0, "steps": 30})})
    with pytest.raises(TrainingDiverged):
        train(absurd, MODEL, ws, run_name="diverges", experiment="diverging", platform=PLATFORM)
    (run,) = _runs(ws, "diverging")
    assert run.info.status == "FAILED"
    assert run.data.tags["lmforge.error"].startswith("TrainingDiverged: pretrain step")
    assert "learning_rate" in run.data.tags["lmforge.error_fix"]
    assert "TrainingDiverged" in run.data.tags["mlflow.note.content"]
    error_file = mlflow_client(ws, PLATFORM).download_artifacts(run.info.run_id, "error.txt", str(tmp_path))
    text = Path(error_file).read_text()
    assert "Traceback" in text and "TrainingDiverged" in text
    assert "loss" in run.data.metrics  # the steps before the divergence were streamed
    assert run.data.params["training.pretrain.learning_rate"] == "1000000.0"

    # A stage after training (evaluate) fails on the model: the flow ends the training's run FAILED;
    # a run recorded in another tracking store is left alone.
    client = mlflow_client(ws, PLATFORM)
    trained = {"mlflow_run_id": client.create_run(run.info.experiment_id).info.run_id,
               "mlflow_tracking_uri": ws.mlflow_tracking_uri}
    elsewhere = {**trained, "mlflow_tracking_uri": "http://127.0.0.1:1"}
    record_failure(elsewhere, PLATFORM, ws, "evaluate", DataError("no held-out text", "collect more"))
    assert client.get_run(trained["mlflow_run_id"]).info.status == "RUNNING"
    record_failure(trained, PLATFORM, ws, "evaluate", DataError("no held-out text", "collect more"))
    marked = client.get_run(trained["mlflow_run_id"])
    assert marked.info.status == "FAILED" and marked.data.tags["lmforge.failed_stage"] == "evaluate"
    assert marked.data.tags["lmforge.error_fix"] == "collect more"


@pytest.mark.slow  # a Ray start; tests/integration/test_train.py's Ray run checks the relay's rows by default
def test_ray_workers_report_through_rank_0_only(ws):
    ray = pytest.importorskip("ray")
    config = TRAINING.model_copy(update={
        "placement": PlacementConfig(use_ray=True, num_workers=2, cpus_per_worker=0.5),
        "pretrain": TRAINING.pretrain.model_copy(update={"steps": 4}),
        "validation": TrainValidationConfig(batches=1)})
    rows: list[dict] = []
    try:
        result = train(config, MODEL, ws, run_name="ray-live", progress=rows.append, experiment="ray-live",
                       platform=PLATFORM)
    finally:
        ray.shutdown()
    client = mlflow_client(ws, PLATFORM)
    assert result.params["world_size"] == 2
    assert rows == result.history  # delivered from rank 0 through the relay, in order, once
    losses = sorted(client.get_metric_history(result.mlflow_run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in losses] == [r["step"] for r in result.history]  # one value per step: rank 0 only
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"


def test_a_resumed_training_reopens_its_run(ws):
    """``--resume RUN_ID`` continues the MLflow run of the attempt it resumes; a changed param becomes a tag."""
    quiet = PLATFORM.model_copy(update={"mlflow_system_metrics_interval_s": 0})
    first = LiveRun.open(ws, quiet, "resumed", "resume-me")
    first.log_params({"training": {"pretrain": {"learning_rate": 0.01}}})
    first.report({"step": 3, "phase": "pretrain", "loss": 4.0})
    first.fail(TrainingDiverged("pretrain step 4: loss nan", "lower training.pretrain.learning_rate"))

    again = LiveRun.open(ws, quiet, "resumed", "resume-me", resume=True)
    assert again.run_id == first.run_id
    client = mlflow_client(ws, PLATFORM)
    assert client.get_run(again.run_id).info.status == "RUNNING"
    again.log_params({"training": {"pretrain": {"learning_rate": 0.005}}})  # resumed at a lower rate
    again.report({"step": 4, "phase": "pretrain", "loss": 3.5})
    again.finish({"params_total": 123}, {"pretrain_loss": 3.5}, step=4)
    run = client.get_run(again.run_id)
    assert run.info.status == "FINISHED" and len(_runs(ws, "resumed")) == 1
    assert run.data.params["training.pretrain.learning_rate"] == "0.01"
    assert run.data.tags["lmforge.param_changed.training.pretrain.learning_rate"] == "0.005"
    assert sorted(m.step for m in client.get_metric_history(again.run_id, "loss")) == [3, 4]
