"""Fault tolerance of training, for real: a Ray Train worker killed with SIGKILL mid-run is restarted
by Ray from the latest checkpoint it reported, and the run ends with the loss curve of an
uninterrupted one; a run whose restarts are used up is continued by ``lmforge train --resume``.

The model is tiny and the loop runs on one CPU thread, so the in-line run (no Ray) is the reference:
one Ray worker trains exactly like it. The kill comes from a watcher thread once Ray Train has
registered the first checkpoint (its snapshot file appears in the run's storage); the workers it
kills are this test's own (descendants of this process, which started Ray), never another's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO
from readme import argv, readme_command

from lmforge.config.base import updated
from lmforge.config.model import ModelConfig
from lmforge.config.training import (
    CheckpointingConfig,
    LoggingConfig,
    PhaseConfig,
    PlacementConfig,
    TrainingConfig,
    TrainValidationConfig,
)
from lmforge.core.errors import LmforgeError
from lmforge.stages.train import train
from lmforge.train.recovery import RAY_SNAPSHOT, ray_storage

MODEL = ModelConfig(vocab_size=384, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=64, max_seq_len=64, dropout=0.1)  # dropout: the RNG must resume too
# Long enough (a few seconds) that the kill lands well before the end. Few checkpoints: Ray Train registers
# each one in about a second on a busy machine, and the run waits for the last registrations before it ends.
TRAINING = TrainingConfig(
    pretrain=PhaseConfig(steps=160, learning_rate=1e-2, batch_size=16, seq_len=64, warmup_steps=5),
    method="pretrain", placement=PlacementConfig(use_ray=True, num_workers=1, cpus_per_worker=1),
    logging=LoggingConfig(every=10), cpu_threads=1, validation=TrainValidationConfig(batches=2),
    checkpointing=CheckpointingConfig(every=40, max_failures=2),
)


@pytest.fixture(scope="module")
def ws(tokenized_workspace):
    return tokenized_workspace("fault", MODEL)


@pytest.fixture(scope="module")
def uninterrupted(ws):
    return train(updated(TRAINING, placement={"use_ray": False}), MODEL, ws, run_name="whole")


def _kill_after_first_checkpoint(ws, run_name: str, killed: list[int]) -> threading.Thread:
    """Start a thread that SIGKILLs this process's Ray Train workers once the run has a checkpoint."""
    storage = Path(ray_storage(ws))

    def watch() -> None:
        deadline = time.monotonic() + 180
        while not killed and time.monotonic() < deadline:
            if any(storage.glob(f"{run_name}-*/{RAY_SNAPSHOT}")):
                for proc in psutil.Process().children(recursive=True):
                    try:
                        if "RayTrainWorker" in " ".join(proc.cmdline()):
                            proc.send_signal(signal.SIGKILL)
                            killed.append(proc.pid)
                    except psutil.Error:
                        continue  # gone already, or not ours to read
            time.sleep(0.02)

    thread = threading.Thread(target=watch, name="kill-ray-worker", daemon=True)
    thread.start()
    return thread


def _assert_same_curve(got: list[dict], expected: list[dict]) -> None:
    assert [(r["phase"], r["step"]) for r in got] == [(r["phase"], r["step"]) for r in expected]
    for row, want in zip(got, expected):
        assert row["loss"] == pytest.approx(want["loss"], rel=1e-5), row["step"]
        assert row["lr"] == pytest.approx(want["lr"], rel=1e-9), row["step"]


@pytest.mark.slow  # Ray start, a kill and Ray's restart: about a minute on a busy 2-core machine (CI: make test-slow)
def test_a_killed_ray_worker_is_restarted_and_the_run_ends_like_an_uninterrupted_one(ws, uninterrupted, ray_session):
    killed: list[int] = []
    watcher = _kill_after_first_checkpoint(ws, "killed", killed)
    result = train(TRAINING, MODEL, ws, run_name="killed")
    watcher.join(timeout=1)
    assert killed, "the watcher found no Ray Train worker to kill"
    assert result.restarts >= 1
    assert 0 < result.resumed_from_step < TRAINING.pretrain.steps
    assert result.resumed_from_step % TRAINING.checkpointing.every == 0
    _assert_same_curve(result.history, uninterrupted.history)
    for name, value in uninterrupted.metrics.items():
        assert result.metrics[name] == pytest.approx(value, rel=1e-5), name
    assert not (Path(ray_storage(ws)) / result.run_id).exists()  # a finished run keeps no checkpoints
    summary = json.loads((ws.runs_dir / result.run_id / "train_result.json").read_text())
    assert summary["restarts"] == result.restarts and summary["resumed_from_step"] == result.resumed_from_step


class Crash(Exception):
    """Stands in for a stopped process: raised from inside an in-line run, after a checkpoint."""


def _crash_at(step: int):
    def progress(row: dict) -> None:
        if row["step"] >= step:
            raise Crash(f"stopped at step {row['step']}")
    return progress


def test_lmforge_train_resume_without_a_run_id_continues_the_newest_stopped_run(ws, uninterrupted, tmp_path, capsys):
    inline = updated(TRAINING, placement={"use_ray": False})
    with pytest.raises(Crash):
        train(inline, MODEL, ws, run_name="crashed", progress=_crash_at(90))
    (stopped,) = [p.name for p in ws.checkpoints_dir.glob("crashed-*")]

    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"model": MODEL.model_dump(mode="json"), "training": inline.model_dump(mode="json")}))
    # README's words, without a run id (the newest stopped run); --json for the facts.
    command = [*argv(readme_command("lmforge train CONFIG --resume"), CONFIG=str(config), RUN_ID=""), "--json"]
    done = subprocess.run(command, cwd=REPO, env=dict(os.environ, LMFORGE_HOME=str(ws.home)), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["run_id"] == stopped
    assert facts["restarts"] == 0 and facts["resumed_from_step"] == 80  # the checkpoint before the crash
    history = json.loads((ws.runs_dir / stopped / "train_result.json").read_text())["history"]
    _assert_same_curve(history, uninterrupted.history)

    from lmforge.cli import main

    assert main(["--home", str(ws.home), "train", str(config), "--resume"]) != 0  # nothing left to resume
    err = capsys.readouterr().err
    assert "no run" in err and "--resume RUN_ID" in err and "Traceback" not in err


@pytest.mark.slow  # a second Ray Train run (a minute on a busy 2-core machine)
def test_a_run_out_of_restarts_is_resumed_under_ray(ws, uninterrupted, ray_session):
    no_retries = updated(TRAINING, checkpointing={"max_failures": 0})
    killed: list[int] = []
    watcher = _kill_after_first_checkpoint(ws, "stopped", killed)
    with pytest.raises(LmforgeError) as err:
        train(no_retries, MODEL, ws, run_name="stopped")
    watcher.join(timeout=1)
    assert killed and "--resume" in err.value.fix
    (stopped,) = [p.name for p in Path(ray_storage(ws)).glob("stopped-*")]

    resumed = train(no_retries, MODEL, ws, resume="latest")  # Ray Train restores the run's own checkpoints
    assert resumed.run_id == stopped and resumed.restarts == 0 and resumed.resumed_from_step > 0
    _assert_same_curve(resumed.history, uninterrupted.history)
