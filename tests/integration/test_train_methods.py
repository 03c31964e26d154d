"""Every training method trains a tiny model for real, lowers its validation loss, and saves
artifacts that reload and generate exactly what the trained model generated before saving.

One pretrained 2-layer Llama (built and trained here) is the base of every fine-tuning run; each
method then runs 20 fine-tuning steps on CPU. Methods that cannot be merged keep their adapter
beside the base inside ``model/`` and load through ``load_trained``.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import BASE_TRAINING, CASES, finetune
from helpers import METHODS_MODEL as MODEL

from lmforge.config.training import (
    AdapterConfig,
    TrainingConfig,
)
from lmforge.core.errors import ConfigError
from lmforge.model.build import build_model
from lmforge.stages.train import train
from lmforge.tokenizer.build import load_tokenizer
from lmforge.train.artifacts import MARKER, greedy_ids, load_probe, load_trained
from lmforge.train.methods.catalog import METHODS, method_info
from lmforge.train.objective import CausalLMObjective


@pytest.fixture(scope="module")
def ws(tokenized_workspace):
    return tokenized_workspace("methods", MODEL)


@pytest.fixture(scope="module")
def base(ws):
    """A pretrained model directory: the base every method fine-tunes."""
    return MODEL.model_copy(update={"base_model": str(train(BASE_TRAINING, MODEL, ws, run_name="base").model_dir)})


@pytest.mark.parametrize("case", list(CASES))
def test_method_trains_and_its_artifacts_reload(ws, base, case):
    result = finetune(ws, base, case)
    metrics = result.metrics
    assert metrics["finetune_val_loss"] < metrics["finetune_val_loss_start"], metrics
    info = method_info(CASES[case]["method"])
    model_dir = result.model_dir
    assert (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer.json").exists()
    assert not [p for p in result.model_dir.parent.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    if info.adapts:
        assert result.params["params_trainable_finetune"] < result.params["params_total"]
        adapter = result.adapter_dir
        assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    mergeable = info.mergeable and case != "llama_adapter"
    assert (model_dir / MARKER).exists() == (info.adapts and not mergeable)

    model = load_trained(model_dir)
    probe = load_probe(model_dir)  # greedy tokens of the trained model, recorded before saving
    assert len(probe["completion_ids"]) > 0
    greedy = greedy_ids(model, load_tokenizer(model_dir), probe["prompt"], probe["max_new_tokens"])
    assert greedy == probe["completion_ids"]


def test_merged_model_gives_the_adapters_logits(ws, base):
    """LoRA and IA3: model/ (merged) and base/ + adapter/ (unmerged) compute the same function."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    for case in ("lora", "ia3"):
        result = finetune(ws, base, case)
        base_model = AutoModelForCausalLM.from_pretrained(result.model_dir.parent / "base")
        with torch.no_grad():
            base_logits = base_model(ids).logits
            adapted = PeftModel.from_pretrained(base_model, result.adapter_dir).eval()(ids).logits
            merged = AutoModelForCausalLM.from_pretrained(result.model_dir)(ids).logits
        assert (adapted - base_logits).abs().max() > 1e-4, case  # the adapter learned something
        torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)


def test_methods_table_is_complete():
    assert set(METHODS) == {"pretrain", "full", "lora", "qlora", "adapter", "prefix", "ptuning_v2", "prompt",
                            "ptuning", "ia3"}
    assert {m for m, info in METHODS.items() if info.mergeable} == {"pretrain", "full", "lora", "qlora", "ia3"}


# ---------------------------------------------------------------- bad input


def test_qlora_without_cuda_names_the_fix(ws, base):
    with pytest.raises(ConfigError) as err:
        finetune(ws, base, "lora", method="qlora")
    assert "CUDA" in err.value.cause and "training.method: lora" in err.value.fix


def test_unknown_method_is_a_config_error(tmp_path):
    from lmforge.config.loader import load_config

    path = tmp_path / "c.yaml"
    path.write_text("training:\n  method: dora\n")
    with pytest.raises(ConfigError, match=re.escape("training.method")):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown training method"):
        method_info("dora")


def test_method_the_architecture_cannot_take(ws, tmp_path):
    gpt_neox = MODEL.model_copy(update={"architecture": "gpt_neox", "num_kv_heads": 4})
    training = BASE_TRAINING.model_copy(update={"method": "adapter", "adapter": AdapterConfig(variant="llama_adapter"),
                                                "pretrain": BASE_TRAINING.pretrain.model_copy(update={"steps": 2})})
    with pytest.raises(ConfigError, match="llama_adapter") as err:
        train(training, gpt_neox, ws, run_name="neox")
    assert "houlsby" in err.value.fix
    gpt2 = MODEL.model_copy(update={"architecture": "gpt2", "num_kv_heads": 4})
    with pytest.raises(ConfigError, match=r"target modules|cannot be applied") as err:
        train(training.model_copy(update={"method": "lora"}), gpt2, ws, run_name="gpt2-lora")
    assert "c_attn" in err.value.fix


def test_virtual_tokens_past_a_learned_position_table_are_refused(ws):
    gpt2 = MODEL.model_copy(update={"architecture": "gpt2", "num_kv_heads": 4})  # finetune seq_len 64 = max_seq_len
    with pytest.raises(ConfigError, match="virtual tokens") as err:
        train(BASE_TRAINING.model_copy(update={"method": "prompt"}), gpt2, ws, run_name="gpt2-prompt")
    assert "num_virtual_tokens" in err.value.fix


def test_legacy_finetune_method_key_still_loads():
    assert TrainingConfig.model_validate({"finetune_method": "none"}).method == "pretrain"
    assert TrainingConfig.model_validate({"finetune_method": "full"}).finetune_method == "full"
    with pytest.raises(ValueError, match="method only"):
        TrainingConfig.model_validate({"finetune_method": "lora", "method": "lora"})


# ---------------------------------------------------------------- the objective


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_fused_loss_matches_plain_cross_entropy_with_label_smoothing(architecture):
    cfg = MODEL.model_copy(update={"architecture": architecture, "num_kv_heads": 4 if architecture == "gpt2" else 2})
    torch.manual_seed(0)
    model = build_model(cfg, 300)
    ids = torch.randint(0, 300, (3, 20))
    labels = ids.clone()
    labels[0, :7] = -100  # an SFT-style prompt
    results = []
    for fused in (False, True):
        model.zero_grad()
        loss = CausalLMObjective(model, label_smoothing=0.1, fused=fused)(ids, labels)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (plain, plain_grads), (fused, fused_grads) = results
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_changes_memory_not_results(ws, base):
    plain = finetune(ws, base, "full")
    checkpointed = finetune(ws, base, "full", speed={"gradient_checkpointing": True})
    assert checkpointed.metrics["finetune_val_loss"] == pytest.approx(plain.metrics["finetune_val_loss"], rel=1e-5)


def test_early_stopping_keeps_the_best_weights(ws, base):
    # A learning rate far too high makes the validation loss rise after the first validation.
    result = finetune(ws, base, "full", validation={"every": 2, "early_stopping_patience": 1},
                      finetune=BASE_TRAINING.finetune.model_copy(update={"learning_rate": 0.3, "warmup_steps": 0}))
    assert 2 < result.metrics["finetune_stopped_early_at"] < BASE_TRAINING.finetune.steps
    assert result.metrics["finetune_val_loss"] == pytest.approx(result.metrics["finetune_val_loss_best"], rel=1e-6)
    assert json.loads((result.model_dir.parent / "train_result.json").read_text())["metrics"] == result.metrics
