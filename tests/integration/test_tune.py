"""`lmforge tune` end to end: 6 trials, 2 at a time, on Ray Tune with ASHA; MLflow (SQLite) holds the runs.

A tiny pretraining-only model with a validation every 3 steps gives ASHA signal; the learning rate's
range spans values that learn and values that barely move, so some trials lag and are stopped.
About a minute on two busy cores (each trial is a Ray actor that imports torch): the slow tier.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml
from conftest import REPO
from readme import argv, readme_command

from lmforge.config import load_config

pytestmark = pytest.mark.slow

CONFIG = {
    "model": {"vocab_size": 384, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "intermediate_size": 64, "max_seq_len": 64},
    "training": {"method": "pretrain", "logging": {"every": 3}, "checkpointing": {"every_minutes": 0},
                 "pretrain": {"steps": 24, "learning_rate": 0.003, "batch_size": 4, "seq_len": 32, "warmup_steps": 2},
                 "validation": {"every": 3, "batches": 1}},
    "tune": {"space": {"training.pretrain.learning_rate": {"loguniform": [1.0e-5, 3.0e-2]},
                       "training.pretrain.warmup_steps": {"choice": [1, 4]}},
             "max_trials": 6, "max_concurrent": 2, "asha": {"grace_period": 2, "reduction_factor": 2}},
}


def test_tune_six_trials_asha_nested_runs(tokenized_workspace, tmp_path):
    from mlflow import MlflowClient

    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    ws = tokenized_workspace("tune", load_config(path).model)
    # The README's command, its words as written: `lmforge tune CONFIG [--json]`.
    result = subprocess.run(argv(readme_command("lmforge tune CONFIG"), CONFIG=str(path)), cwd=REPO, text=True,
                            env=dict(os.environ, LMFORGE_HOME=str(ws.home)), capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["trials"] == 6 and summary["failed"] == 0
    assert summary["stopped_early"] >= 1 and summary["completed"] + summary["stopped_early"] == 6
    best = summary["best"]
    assert set(best["params"]) == set(CONFIG["tune"]["space"]) and best["metric"] > 0
    # The best config is a pipeline config with the best trial's values, ready for `lmforge train`.
    chosen = load_config(summary["best_config"])
    assert chosen.training.pretrain.learning_rate == pytest.approx(best["params"]["training.pretrain.learning_rate"])
    # The trials were not the workspace's trained model: the train hand-off is untouched.
    assert ws.read_state("train") is None

    client = MlflowClient(ws.mlflow_tracking_uri)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.metrics["best_pretrain_val_loss"] == best["metric"]
    nested = client.search_runs([parent.info.experiment_id],
                                f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}'")
    assert len(nested) == 6
    outcomes = sorted(run.data.tags["lmforge.tune.outcome"] for run in nested)
    assert outcomes.count("stopped_early") == summary["stopped_early"]
    for run in nested:
        assert "tune.training.pretrain.learning_rate" in run.data.params
        assert run.data.params["model.hidden_size"] == "32"  # the full config, flattened
        curve = client.get_metric_history(run.info.run_id, "pretrain_val_loss")
        assert len(curve) >= 2
        assert run.info.status == ("KILLED" if run.data.tags["lmforge.tune.outcome"] == "stopped_early" else "FINISHED")
