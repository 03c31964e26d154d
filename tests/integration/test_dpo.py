"""Preference tuning as a user runs it: `lmforge collect` reads a preference file, `lmforge curate`, then
`lmforge train --json` with `training.method: dpo` prints the rewards and streams them to the MLflow
run; and DPO under Ray Train (two DDP ranks: the vector loss, its metric all-reduce and the sharded
reference scoring) matches one worker of the same global batch."""

from __future__ import annotations

import json
import time

import pytest
import yaml
from conftest import run_cli
from helpers import METHODS_MODEL as MODEL
from helpers import write_preferences

from lmforge.config.training import LoggingConfig, PhaseConfig, PlacementConfig, TrainingConfig, TrainValidationConfig
from lmforge.stages.train import train
from lmforge.train.preference import METRICS

PREFS = [{"prompt": f"Name a prime above {n}.", "chosen": f"{p} is a prime.", "rejected": f"{p + 1} is a prime."}
         for n, p in ((1, 2), (4, 5), (6, 7), (10, 11), (12, 13), (16, 17), (18, 19), (22, 23), (28, 29), (30, 31))]


@pytest.mark.slow  # tests/e2e/test_own_data.py runs the same stages through the pipeline in make test
def test_collect_curate_and_train_dpo_through_the_cli(tmp_path):
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PREFS))
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"sources": [{"type": "stdlib", "max_bytes": 60000}], "progress_interval_s": 0,
                 "instructions": {"max_records": 40},
                 "preferences": {"sources": [{"type": "local", "paths": [str(tmp_path / "prefs.jsonl")]}]}},
        "model": MODEL.model_dump(mode="json", exclude_defaults=True),
        "training": {"method": "dpo", "preference": {"beta": 0.2}, "pretrain": {"steps": 0, "learning_rate": 0.01},
                     "finetune": {"steps": 4, "learning_rate": 0.01, "batch_size": 4, "seq_len": 64, "warmup_steps": 1},
                     "placement": {"use_ray": False}, "logging": {"every": 1}, "validation": {"batches": 1},
                     "cpu_threads": 1},
    }))
    home = tmp_path / "home"
    for stage in ("collect", "curate"):
        done = run_cli([stage, str(config)], home)
        assert done.returncode == 0, done.stderr[-2000:]
    proc = run_cli(["train", str(config), "--json"], home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["params"]["training.method"] == "lora" and summary["params"]["training.preference.loss"] == "dpo"
    assert summary["params"]["data_finetune"] == "preference pairs train.jsonl"
    for name in METRICS:
        assert f"finetune_{name}" in summary["metrics"] and f"finetune_val_{name}" in summary["metrics"]
    assert summary["adapter_dir"] and summary["mlflow_run_id"]

    from mlflow import MlflowClient

    client = MlflowClient(summary["mlflow_tracking_uri"])
    margins = client.get_metric_history(summary["mlflow_run_id"], "reward_margin")
    assert sorted(m.step for m in margins) == [1, 2, 3, 4]  # every logged step reached the run
    assert client.get_run(summary["mlflow_run_id"]).data.metrics["finetune_val_reward_accuracy"] >= 0


@pytest.mark.slow  # starting Ray takes most of a minute on a 2-core machine; test_train.py covers Ray in the default run
def test_ray_ddp_dpo_two_workers_match_one_worker_with_the_same_global_batch(tokenized_workspace, ray_session):
    ws = tokenized_workspace("dpo-ray", MODEL)
    write_preferences(ws, pairs=20)
    config = TrainingConfig(
        pretrain=PhaseConfig(steps=0, learning_rate=1e-2),
        finetune=PhaseConfig(steps=4, learning_rate=1e-2, batch_size=4, seq_len=64, warmup_steps=1),
        method="dpo", lora={"dropout": 0.0},  # dropout masks would differ by rank
        placement=PlacementConfig(use_ray=True, num_workers=2, cpus_per_worker=0.5), logging=LoggingConfig(every=1),
        cpu_threads=1, validation=TrainValidationConfig(batches=2))
    started = time.perf_counter()
    ddp = train(config, MODEL, ws, run_name="dpo-ray")
    print(f"\nDPO under Ray Train (2 CPU workers) took {time.perf_counter() - started:.1f} s wall")
    single = train(config.model_copy(update={"placement": PlacementConfig(use_ray=False, num_workers=1),
                                             "finetune": config.finetune.model_copy(update={"batch_size": 8})}),
                   MODEL, ws, run_name="dpo-one")
    assert ddp.params["world_size"] == 2 and single.params["world_size"] == 1
    assert [r["step"] for r in ddp.history] == [r["step"] for r in single.history] == [1, 2, 3, 4]
    for two, one in zip(ddp.history, single.history):
        for key in ("loss", *METRICS):
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), (key, two, one)
    for key in ("finetune_val_loss", *(f"finetune_val_{m}" for m in METRICS)):
        assert ddp.metrics[key] == pytest.approx(single.metrics[key], rel=1e-4, abs=1e-6), key
