"""`lmforge model info`: parameter counts match the real model, FLOPs follow the stated formula,
memory parts respond to the settings that change them, and an impossible batch is warned about.
"""

from __future__ import annotations

import json

import pytest

from lmforge.cli import main
from lmforge.config.base import updated
from lmforge.config.model import ModelConfig
from lmforge.config.training import LoraConfig, LossConfig, PhaseConfig, PlacementConfig, TrainingConfig
from lmforge.model.build import build_model, count_parameters
from lmforge.model.info import describe, fit_warning, mfu, train_flops_per_token

TINY = ModelConfig(vocab_size=384, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=64, max_seq_len=64)
TINYLLAMA = ModelConfig(architecture="llama", vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32,
                        num_kv_heads=4, intermediate_size=5632, max_seq_len=2048, tie_embeddings=False)
PHASE = PhaseConfig(steps=10, learning_rate=1e-4, batch_size=8, seq_len=2048)


def test_counts_and_flops_match_the_built_model():
    info = describe(TINY, TrainingConfig(method="lora"), vocab_size=300)
    assert info.params_total == count_parameters(build_model(TINY, 300))
    assert 0 < info.params_trainable_finetune < info.params_total
    seq = TrainingConfig().pretrain.seq_len
    assert info.train_flops_per_token["pretrain"] == 6 * info.params_total + 12 * 2 * 32 * seq


def test_a_llama_1b_on_the_meta_device():
    cpu = PlacementConfig(use_gpu=False)
    info = describe(TINYLLAMA, TrainingConfig(method="full", placement=cpu, finetune=PHASE), vocab_size=32000)
    assert info.params_total == 1_100_048_384  # TinyLlama's shape
    flops = train_flops_per_token(info.params_total, 22, 2048, 2048)
    assert mfu(64_000, flops) == pytest.approx(0.50, abs=0.01)  # the "64k tokens/s ≈ 50% MFU"
    full = next(m for m in info.memory if m.phase == "finetune")
    assert full.weights == full.gradients == 4 * info.params_total and full.optimizer == 8 * info.params_total


def test_memory_parts_follow_the_settings():
    base = TrainingConfig(method="full", finetune=PHASE, loss=LossConfig(fused=False))

    def mem(training: TrainingConfig):
        return next(m for m in describe(TINYLLAMA, training, 32000).memory if m.phase == "finetune")

    plain = mem(base)
    fused = mem(updated(base, loss={"fused": True}))
    assert fused.activations < plain.activations - 3 * 2**30  # no 16k x 32k logits in float32
    checkpointed = mem(updated(base, loss={"fused": True}, speed={"gradient_checkpointing": True}))
    assert checkpointed.activations < fused.activations / 5
    lora = mem(updated(base, method="lora", placement={"use_gpu": True},
                       lora=LoraConfig(target_modules=["all-linear"])))
    assert lora.optimizer < plain.optimizer / 50 and lora.weights < plain.weights


def test_an_impossible_batch_is_warned_about():
    huge = TrainingConfig(method="full", finetune=PHASE.model_copy(update={"batch_size": 4096}))
    warning = fit_warning(TINYLLAMA, huge, 32000)
    assert warning and "GiB" in warning and "gradient_checkpointing" in warning
    assert fit_warning(TINY, TrainingConfig(), 384) is None


def test_cli_model_info(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"model": TINY.model_dump(mode="json"), "training": {"method": "ia3"}}))
    assert main(["model", "info", str(config), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert facts["params_total"] > facts["params_trainable_finetune"] > 0
    assert [m["phase"] for m in facts["memory"]] == ["pretrain", "finetune"] and facts["warning"] is None
    assert main(["model", "info", str(config)]) == 0
    text = capsys.readouterr().out
    assert "parameters:" in text and "GFLOP per trained token" in text and "finetune (ia3" in text
