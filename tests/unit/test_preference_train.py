"""Preference tuning through the one training loop, in-process on a tiny model from config: the reward
margin and accuracy grow on the pairs trained on (DPO over several trainable parts, and ORPO), the
rewards are in history, metrics and validation; a stopped DPO run resumes to the bit; a DPO config
without a preference set is refused with the fix."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import METHODS_MODEL, write_preferences

from lmforge.config.base import updated
from lmforge.config.training import (
    CheckpointingConfig,
    LoggingConfig,
    LoraConfig,
    PhaseConfig,
    PlacementConfig,
    TrainingConfig,
    TrainValidationConfig,
)
from lmforge.core.errors import ConfigError
from lmforge.stages.train import train
from lmforge.train.checkpoint import LATEST
from lmforge.train.preference import METRICS

MODEL = METHODS_MODEL.model_copy(update={"dropout": 0.1})
# Eight pairs in one batch, so each step sees them all and the rewards on them can only improve.
TRAINING = TrainingConfig(
    pretrain=PhaseConfig(steps=0, learning_rate=1e-2),
    finetune=PhaseConfig(steps=8, learning_rate=1e-2, batch_size=8, seq_len=64, warmup_steps=0, schedule="constant"),
    method="dpo", lora=LoraConfig(dropout=0.1), placement=PlacementConfig(use_ray=False),
    logging=LoggingConfig(every=1), cpu_threads=1, validation=TrainValidationConfig(batches=1),
)


@pytest.fixture(scope="module")
def ws(tokenized_workspace):
    ws = tokenized_workspace("preference", MODEL)
    write_preferences(ws, pairs=10)  # two held out for validation
    return ws


@pytest.mark.parametrize(("case", "changes"), [
    ("dpo_lora", {}),
    ("orpo_lora", {"preference": {"loss": "orpo"}}),
    ("dpo_full", {"method": "full", "preference": {"loss": "dpo"}, "finetune": {"learning_rate": 1e-3}}),
    ("dpo_prefix", {"method": "prefix", "preference": {"loss": "dpo"}}),  # logits path (virtual tokens)
    ("dpo_adapter", {"method": "adapter", "preference": {"loss": "dpo"}}),  # our bottleneck adapters
])
def test_rewards_move_the_right_way_on_the_pairs_trained_on(ws, case, changes):
    result = train(updated(TRAINING, **changes), MODEL, ws, run_name=case, progress=lambda row: None)
    first, last = result.history[0], result.history[-1]
    assert set(METRICS) <= set(first) and first["step"] == 1 and last["step"] == 8
    assert last["reward_margin"] > first["reward_margin"] and last["reward_margin"] > 0, result.history
    assert last["reward_accuracy"] >= 0.75 and last["loss"] < first["loss"], result.history
    if case in ("dpo_lora", "dpo_full", "dpo_adapter"):  # they start as the base, the reference: loss log 2, no reward
        assert first["loss"] == pytest.approx(0.6931, abs=2e-2) and result.metrics["finetune_val_loss_start"] == \
            pytest.approx(0.693147, abs=1e-5) and result.metrics["finetune_val_reward_margin_start"] == 0
    metrics = result.metrics
    for name in METRICS:
        assert metrics[f"finetune_{name}"] == last[name]
        assert f"finetune_val_{name}" in metrics and f"finetune_val_{name}_start" in metrics
    assert result.params["data_finetune"] == "preference pairs train.jsonl"
    assert result.params["data_finetune_validation_rows"] == 2
    assert not (ws.checkpoints_dir / result.run_id).exists()  # reference scores went with the checkpoints


class Crash(Exception):
    """Stands in for a killed process: raised from inside the run."""


# Full fine-tuning after a pretraining phase: the resumed run rebuilds the model before its weights are
# restored, so a reference scored again then would be wrong; it must read the one kept with the checkpoints.
@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_stopped_dpo_run_resumes_to_the_bit(ws, method):
    training = updated(TRAINING, method=method, preference={"loss": "dpo"}, checkpointing=CheckpointingConfig(every=3),
                       pretrain={"steps": 3, "seq_len": 32, "warmup_steps": 1}, finetune={"grad_accum": 2, "batch_size": 4})
    whole = train(training, MODEL, ws, run_name=f"whole-{method}", progress=lambda row: None)

    def crash(row: dict) -> None:
        if row["phase"] == "finetune" and row["step"] >= 8:
            raise Crash

    with pytest.raises(Crash):
        train(training, MODEL, ws, run_name=f"crash-{method}", progress=crash)
    (root,) = ws.checkpoints_dir.glob(f"crash-{method}-*")
    assert json.loads((root / LATEST).read_text())["tag"] == "finetune-0000003"
    assert (root / "reference.safetensors").exists()
    resumed = train(training, MODEL, ws, resume=root.name, progress=lambda row: None)

    def curve(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in history]

    assert curve(resumed.history) == curve(whole.history)  # losses and rewards equal to the bit
    assert resumed.metrics == whole.metrics
    from safetensors.torch import load_file

    a, b = (load_file(r.model_dir / "model.safetensors") for r in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dpo_without_a_preference_set_names_the_fix(tmp_path, tokenized_workspace):
    bare = tokenized_workspace("no-preferences", MODEL)
    with pytest.raises(ConfigError) as err:
        train(TRAINING, MODEL, bare, run_name="nothing")
    assert "no preference set" in err.value.cause and "training.method: dpo" in err.value.cause
    assert "data.preferences.sources" in err.value.fix
    shutil.rmtree(tmp_path, ignore_errors=True)
