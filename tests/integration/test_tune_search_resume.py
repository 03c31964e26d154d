"""A stopped search continues: `lmforge tune` killed (with its whole process group, Ray included) after a
trial finished, then `lmforge tune CONFIG --resume` runs the rest into the same parent MLflow run, one
nested run per trial and no duplicate; and Optuna's searcher with `tune.register_best` registers the best
config's model. Real Ray Tune, real MLflow on SQLite; a minute or two each on two busy cores: slow tier."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time

import psutil
import pytest
import yaml
from conftest import REPO
from readme import argv, readme_command

from lmforge.config import load_config

pytestmark = pytest.mark.slow

MODEL = {"vocab_size": 384, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
         "intermediate_size": 64, "max_seq_len": 64}
TRAINING = {"method": "pretrain", "logging": {"every": 3}, "checkpointing": {"every": 3, "every_minutes": 0},
            "pretrain": {"steps": 18, "learning_rate": 0.003, "batch_size": 4, "seq_len": 32, "warmup_steps": 2},
            "validation": {"every": 3, "batches": 1}}
SPACE = {"training.pretrain.learning_rate": {"loguniform": [1.0e-5, 3.0e-2]}}


def _config(tmp_path, tune: dict) -> tuple:
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL, "training": TRAINING, "tune": {"space": SPACE, **tune}}))
    return path, load_config(path)


def _nested(client, parent_id: str) -> list:
    parent = client.get_run(parent_id)
    return client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the search and every process it started (Ray's GCS, raylet and trial workers)."""
    try:
        family = psutil.Process(process.pid).children(recursive=True)
        os.killpg(process.pid, signal.SIGKILL)
    except (psutil.NoSuchProcess, ProcessLookupError):  # it ended by itself (the assertion says how)
        family = []
    for child in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    process.wait(timeout=30)
    psutil.wait_procs(family, timeout=30)


def test_a_killed_search_resumes_into_the_same_parent_run(tokenized_workspace, tmp_path):
    from mlflow import MlflowClient

    path, config = _config(tmp_path, {"max_trials": 4, "max_concurrent": 2, "scheduler": "none"})
    ws = tokenized_workspace("tune-resume", config.model)
    # Ray Tune saves its experiment's state every second (default: adaptive, ten seconds or more).
    env = dict(os.environ, LMFORGE_HOME=str(ws.home), TUNE_GLOBAL_CHECKPOINT_S="1")
    first = subprocess.Popen(argv(readme_command("lmforge tune CONFIG"), CONFIG=str(path)), cwd=REPO,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    client = MlflowClient(ws.mlflow_tracking_uri)
    deadline = time.monotonic() + 420
    parent_id = None
    try:
        while time.monotonic() < deadline:  # until one trial finished (and its state was saved)
            assert first.poll() is None, first.stderr.read().decode()[-3000:] if first.stderr else "exited"
            records = list((ws.home / "tune").glob("*/search.json"))
            if records:
                experiment = client.get_experiment_by_name(config.registry.experiment)
                runs = client.search_runs([experiment.experiment_id]) if experiment else []
                done = [r for r in runs if r.data.tags.get("lmforge.tune.outcome") == "completed"]
                if done:
                    parent_id = done[0].data.tags["mlflow.parentRunId"]
                    time.sleep(3)  # the experiment state after that trial
                    break
            time.sleep(1)
        assert parent_id, "no trial finished in time"
    finally:
        _kill_group(first)
    tune_id = json.loads(records[0].read_text())["tune_id"]
    assert not (ws.home / "tune" / tune_id / "result.json").exists()

    resume = readme_command("lmforge tune CONFIG --resume")
    resumed = subprocess.run(argv(resume, CONFIG=str(path), TUNE_ID=tune_id), cwd=REPO,
                             env=env, text=True, capture_output=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["tune_id"] == tune_id and summary["mlflow_run_id"] == parent_id
    assert summary["trials"] == 4 and summary["completed"] == 4 and summary["failed"] == 0
    nested = _nested(client, parent_id)
    assert len(nested) == 4  # the trials that ran before the kill went on in their runs
    assert sorted(run.data.tags["lmforge.tune.trial_id"] for run in nested) == sorted(
        o["trial_id"] for o in json.loads((ws.home / "tune" / tune_id / "result.json").read_text())["trial_outcomes"])
    assert all(run.info.status == "FINISHED" for run in nested)
    assert client.get_run(parent_id).info.status == "FINISHED"

    again = subprocess.run(argv(resume, CONFIG=str(path), TUNE_ID=tune_id), cwd=REPO,
                           env=env, text=True, capture_output=True, timeout=120)
    assert again.returncode == 2 and f"error: --resume {tune_id}: that search ended" in again.stderr
    assert "Traceback" not in again.stderr


@pytest.mark.skipif(__import__("importlib").util.find_spec("optuna") is None, reason="optuna is not installed")
def test_optuna_search_registers_the_best_config(tokenized_workspace, tmp_path):
    from mlflow import MlflowClient

    path, config = _config(tmp_path, {"max_trials": 2, "max_concurrent": 1, "scheduler": "none",
                                      "searcher": "optuna", "register_best": True})
    ws = tokenized_workspace("tune-optuna", config.model)
    # The evaluate stage scores held-out instructions as well: a few of the corpus's SFT records.
    (ws.sft_dir / "test.jsonl").write_text("".join((ws.sft_dir / "train.jsonl").read_text().splitlines(True)[:4]))
    result = subprocess.run(argv(readme_command("lmforge tune CONFIG"), CONFIG=str(path)), cwd=REPO,
                            text=True, env=dict(os.environ, LMFORGE_HOME=str(ws.home)), capture_output=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["trials"] == 2 and summary["completed"] == 2
    registered = summary["registered"]
    assert registered and registered["version"]
    client = MlflowClient(ws.mlflow_tracking_uri)
    version = client.get_model_version(config.registry.model_name, str(registered["version"]))
    assert version.run_id == registered["mlflow_run_id"]
    best = load_config(summary["best_config"])
    lr = best.training.pretrain.learning_rate
    assert lr == pytest.approx(summary["best"]["params"]["training.pretrain.learning_rate"])
    assert (ws.runs_dir / registered["train_run_id"] / "model" / "config.json").is_file()  # trained, not a trial's
