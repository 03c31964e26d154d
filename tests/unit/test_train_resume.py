"""Checkpoints: a run stopped and resumed ends exactly like an uninterrupted one; a diverged run
keeps its last good checkpoint and names the step; checkpoints are safetensors + JSON only.

Dropout (model and LoRA) is on, so resuming must restore the random generators as well as the
weights, optimizer, schedule and data position. The crash is real: the progress callback raises
in the middle of a phase, after a checkpoint and before the next.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmforge.config.base import updated
from lmforge.config.model import ModelConfig
from lmforge.config.training import (
    CheckpointingConfig,
    LoggingConfig,
    LoraConfig,
    PhaseConfig,
    PlacementConfig,
    TrainingConfig,
    TrainValidationConfig,
)
from lmforge.core.errors import ConfigError, TrainingDiverged
from lmforge.stages.train import train
from lmforge.train.checkpoint import LATEST

MODEL = ModelConfig(vocab_size=384, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=64, max_seq_len=64, dropout=0.1)
TRAINING = TrainingConfig(
    pretrain=PhaseConfig(steps=12, learning_rate=1e-2, batch_size=8, seq_len=32, warmup_steps=2),
    finetune=PhaseConfig(steps=10, learning_rate=1e-2, batch_size=8, seq_len=64, warmup_steps=2, grad_accum=2),
    method="lora", lora=LoraConfig(dropout=0.1), placement=PlacementConfig(use_ray=False),
    logging=LoggingConfig(every=1), cpu_threads=1, validation=TrainValidationConfig(batches=2),
    checkpointing=CheckpointingConfig(every=4),
)


class Crash(Exception):
    """Stands in for a killed process: raised from inside the run."""


@pytest.fixture(scope="module")
def ws(tokenized_workspace):
    return tokenized_workspace("resume", MODEL)


@pytest.fixture(scope="module")
def uninterrupted(ws):
    return train(TRAINING, MODEL, ws, run_name="whole", progress=lambda row: None)


def _curve(history: list[dict]) -> list[tuple]:
    return [(r["phase"], r["step"], r["loss"], r["lr"]) for r in history]


def _crash_at(step: int):
    def progress(row: dict) -> None:
        if row["step"] >= step:
            raise Crash(f"stopped at step {row['step']}")
    return progress


# Inside pretraining, resumed through `python -m lmforge.train CONFIG --resume RUN_ID`; inside
# fine-tuning (after the checkpoint of global step 16), resumed through the API.
@pytest.mark.parametrize("crash_step,cli", [(10, True), (19, False)])
def test_stopped_and_resumed_run_ends_like_an_uninterrupted_one(ws, uninterrupted, crash_step, cli, tmp_path):
    before = {p.name for p in (ws.home / "checkpoints").glob("*")}
    with pytest.raises(Crash):
        train(TRAINING, MODEL, ws, run_name=f"crash{crash_step}", progress=_crash_at(crash_step))
    (root,) = [p for p in (ws.home / "checkpoints").glob("*") if p.name not in before]
    latest = json.loads((root / LATEST).read_text())
    assert latest["tag"] == ("pretrain-0000008" if crash_step == 10 else "finetune-0000004")
    files = {p.name for p in (root / latest["tag"]).iterdir()}
    assert files == {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"}

    if cli:
        from lmforge.train.__main__ import main

        config = tmp_path / "run.yaml"
        config.write_text(json.dumps({"model": MODEL.model_dump(mode="json"),
                                      "training": TRAINING.model_dump(mode="json")}))
        assert main([str(config), "--home", str(ws.home), "--resume", root.name]) == 0
        state = ws.read_state("train")
        resumed = SimpleNamespace(run_id=state["run_id"], history=state["history"], metrics=state["metrics"],
                                  model_dir=Path(state["model_dir"]))
    else:
        resumed = train(TRAINING, MODEL, ws, resume=root.name, progress=lambda row: None)
    assert resumed.run_id == root.name
    expected = _curve(uninterrupted.history)
    got = _curve(resumed.history)
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    for (_, _, loss, lr), (_, _, want_loss, want_lr) in zip(got, expected):
        assert loss == pytest.approx(want_loss, rel=1e-5) and lr == pytest.approx(want_lr, rel=1e-9)
    for name, value in uninterrupted.metrics.items():
        assert resumed.metrics[name] == pytest.approx(value, rel=1e-5), name
    assert not root.exists()  # a finished run keeps no checkpoints

    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(uninterrupted.model_dir).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(resumed.model_dir).eval()(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_divergence_keeps_the_last_good_checkpoint_and_names_the_step(ws):
    absurd = updated(TRAINING, method="pretrain", checkpointing={"every": 1},
                     pretrain={"learning_rate": 1e6, "warmup_steps": 0})
    before = {p.name for p in (ws.home / "checkpoints").glob("*")}
    runs_before = set(ws.runs_dir.iterdir())
    with pytest.raises(TrainingDiverged) as err:
        train(absurd, MODEL, ws, run_name="nan")
    (root,) = [p for p in (ws.home / "checkpoints").glob("*") if p.name not in before]
    tag = json.loads((root / LATEST).read_text())["tag"]
    bad_step = int(err.value.cause.split("step ")[1].split(":")[0])
    assert tag == f"pretrain-{bad_step - 1:07d}"  # the step before the first non-finite loss
    assert str(root / tag) in err.value.cause and "learning_rate" in err.value.fix
    assert set(ws.runs_dir.iterdir()) == runs_before  # no half-written run directory


def test_resume_refuses_another_model_or_method(ws):
    with pytest.raises(Crash):
        train(TRAINING, MODEL, ws, run_name="mismatch", progress=_crash_at(10))
    (root,) = [p for p in (ws.home / "checkpoints").glob("mismatch-*")]
    with pytest.raises(ConfigError, match=re.escape("another model, training method or training.speed.fp8")):
        train(TRAINING.model_copy(update={"method": "full"}), MODEL, ws, resume=root.name)
    with pytest.raises(ConfigError, match="no checkpoint to resume"):
        train(TRAINING, MODEL, ws, resume="never-ran")


def test_a_resumed_phase_runs_at_the_learning_rate_it_is_given(tmp_path):
    # A checkpoint keeps the schedule's position; the resumed run chooses the peak rate. Resumed at a
    # rate too small to move float32 weights, the weights must stay exactly as checkpointed.
    from lmforge.model.build import build_model
    from lmforge.train import checkpoint as ckpt
    from lmforge.train.data import batch_stream
    from lmforge.train.loop import train_phase

    ids = torch.randint(0, 384, (32, 32), generator=torch.Generator().manual_seed(5))
    rows = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    phase = PhaseConfig(steps=6, learning_rate=1e-2, batch_size=4, seq_len=32, warmup_steps=1)
    training = TrainingConfig(method="pretrain", placement=PlacementConfig(use_ray=False),
                              logging=LoggingConfig(every=1), cpu_threads=1, checkpointing=CheckpointingConfig(every=3))
    torch.manual_seed(0)
    model = build_model(MODEL.model_copy(update={"dropout": 0.0}), 384)

    def save(step, tensors, loop_state):
        return ckpt.save(tmp_path, f"pretrain-{step:07d}", tensors, {"loop": loop_state}, 2)

    train_phase(model, "pretrain", phase, training, batch_stream(rows, 4, seed=0), [], torch.device("cpu"), save=save)
    saved = ckpt.load_latest(tmp_path)
    assert saved.state["loop"]["step"] == 6
    slower = phase.model_copy(update={"steps": 9, "learning_rate": 1e-12})
    history, _ = train_phase(model, "pretrain", slower, training, batch_stream(rows, 4, seed=0, skip=6), [],
                             torch.device("cpu"), resume=saved)
    assert [row["step"] for row in history][-3:] == [7, 8, 9]
    assert all(row["lr"] < 1e-11 for row in history[-3:])
    for name, value in ckpt.trainable_state(model).items():
        torch.testing.assert_close(value, saved.tensors["model"][name], rtol=0, atol=0)
