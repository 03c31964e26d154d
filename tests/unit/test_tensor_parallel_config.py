"""``training.parallel.tensor_parallel``'s checks: settings and models the DTensor plan cannot run fail at config time."""

from __future__ import annotations

import pytest

from lmforge.config.model import ModelConfig
from lmforge.config.pipeline import PipelineConfig
from lmforge.config.training import TrainingConfig
from lmforge.core.errors import ConfigError
from lmforge.model.build import build_model
from lmforge.train import tensor_parallel

MODEL = ModelConfig(vocab_size=256, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=128,
                    max_seq_len=32)


@pytest.mark.parametrize("settings,needle", [
    ({"parallel": {"sequence_parallel": True}}, "tensor_parallel is 1"),
    ({"parallel": {"tensor_parallel": 2}, "placement": {"use_ray": False}}, "use_ray"),
    ({"parallel": {"tensor_parallel": 2}, "method": "lora"}, "method pretrain or full"),
    ({"parallel": {"tensor_parallel": 2}, "placement": {"num_workers": 4}}, "num_workers: 2"),
    ({"parallel": {"tensor_parallel": 3, "strategy": "fsdp"}, "placement": {"num_workers": 4}}, "multiple of 3"),
    ({"parallel": {"tensor_parallel": 2}, "placement": {"num_workers": 2}, "speed": {"compile": True}}, "compile"),
])
def test_bad_tensor_parallel_settings_fail_at_config_time(settings, needle):
    with pytest.raises(ValueError, match=needle):
        TrainingConfig.model_validate({"method": "pretrain", **settings})


@pytest.mark.parametrize("model,needle", [
    ({"num_heads": 3, "num_kv_heads": 3, "hidden_size": 96}, r"num_heads \(3\).*num_kv_heads \(3\): 3"),
    ({"num_heads": 4, "num_kv_heads": 1}, r"num_kv_heads \(1\)"),
    ({"architecture": "gpt2", "num_kv_heads": 4}, "llama, mistral, qwen2"),
])
def test_a_model_the_plan_cannot_split_fails_at_config_time(model, needle):
    training = {"method": "pretrain", "parallel": {"tensor_parallel": 2}, "placement": {"num_workers": 2}}
    with pytest.raises(ValueError, match=needle):
        PipelineConfig.model_validate({"model": model, "training": training})
    config = build_model(MODEL.model_copy(update=model), 256).config
    with pytest.raises(ConfigError, match=needle):
        tensor_parallel.check_model(TrainingConfig.model_validate(training), config)


def test_outside_a_process_group_there_is_no_tensor_parallel_group():
    training = TrainingConfig.model_validate({"method": "pretrain", "parallel": {"tensor_parallel": 2},
                                              "placement": {"num_workers": 2}})
    assert tensor_parallel.degree(training) == 1
    assert tensor_parallel.data_rank(training) == (0, 1)
    tensor_parallel.check_group(training)  # nothing to check in one process


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_block_plan_splits_attention_and_mlp_columns_then_rows(sequence_parallel):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    plan = tensor_parallel.block_plan(sequence_parallel)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        assert isinstance(plan[name], ColwiseParallel), name
    for name in ("self_attn.o_proj", "mlp.down_proj"):
        assert isinstance(plan[name], RowwiseParallel), name
    norms = [plan.get(n) for n in ("input_layernorm", "post_attention_layernorm")]
    assert all(isinstance(n, SequenceParallel) for n in norms) == sequence_parallel
