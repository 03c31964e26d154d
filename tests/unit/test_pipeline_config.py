"""``training.parallel.pipeline_parallel``'s checks: settings and models the stages cannot run fail at config time."""

from __future__ import annotations

import pytest

from lmforge.config.model import ModelConfig
from lmforge.config.pipeline import PipelineConfig
from lmforge.config.training import TrainingConfig
from lmforge.core.errors import ConfigError
from lmforge.model.build import build_model
from lmforge.train import pipeline

PP = {"pipeline_parallel": 2}
WORKERS = {"num_workers": 2}


@pytest.mark.parametrize("settings,needle", [
    ({"parallel": PP, "placement": {"use_ray": False}}, "use_ray"),
    ({"parallel": PP, "placement": {"num_workers": 3}}, "multiple of 2"),
    ({"parallel": {**PP, "strategy": "fsdp"}, "placement": WORKERS}, "strategy fsdp"),
    ({"parallel": {**PP, "tensor_parallel": 2}, "placement": {"num_workers": 4}}, "tensor_parallel"),
    ({"parallel": PP, "placement": WORKERS, "method": "lora"}, "method pretrain or full"),
    ({"parallel": PP, "placement": WORKERS, "method": "qlora"}, "method pretrain or full"),
    ({"parallel": PP, "placement": WORKERS, "speed": {"compile": True}}, "speed.compile"),
    ({"parallel": PP, "placement": WORKERS, "speed": {"compile_optimizer": True}}, "compile_optimizer"),
    ({"parallel": {**PP, "pipeline_microbatches": 1}, "placement": WORKERS}, "at least 4"),
    ({"parallel": {**PP, "pipeline_microbatches": 3, "pipeline_schedule": "interleaved_1f1b"}, "placement": WORKERS},
     "multiple of pipeline_parallel"),
    ({"parallel": PP, "placement": WORKERS, "pretrain": {"batch_size": 6}}, r"divisor of 6"),
    ({"parallel": {**PP, "pipeline_schedule": "zero_bubble"}, "placement": WORKERS}, "pipeline_schedule"),
])
def test_bad_pipeline_settings_fail_at_config_time(settings, needle):
    with pytest.raises(ValueError, match=needle):
        TrainingConfig.model_validate({"method": "pretrain", **settings})


def test_good_pipeline_settings_pass_and_default_to_two_micro_batches_per_stage():
    training = TrainingConfig.model_validate({"method": "full", "parallel": PP, "placement": {"num_workers": 4},
                                              "pretrain": {"batch_size": 8}, "finetune": {"batch_size": 4}})
    assert training.parallel.microbatches() == 4
    interleaved = training.parallel.model_copy(update={"pipeline_schedule": "interleaved_1f1b"})
    assert (interleaved.pipeline_stages(), interleaved.microbatches()) == (4, 8)


@pytest.mark.parametrize("model,schedule,needle", [
    ({"num_layers": 1}, "1f1b", r"(?s)needs 2 stages, and the model has 1 layers.*at most 1"),
    ({"num_layers": 3}, "interleaved_1f1b", r"(?s)needs 4 stages \(interleaved_1f1b: two per worker\).*3 layers"),
    ({"architecture": "gpt2", "num_layers": 2, "num_kv_heads": 4}, "1f1b", "llama, mistral, qwen2"),
])
def test_a_model_the_stages_cannot_cut_fails_at_config_time(model, schedule, needle):
    training = {"method": "pretrain", "parallel": {**PP, "pipeline_schedule": schedule}, "placement": WORKERS}
    with pytest.raises(ValueError, match=needle):
        PipelineConfig.model_validate({"model": model, "training": training})
    # A base_model's layers are known on the workers only: the same check there, as a ConfigError.
    built = build_model(ModelConfig(vocab_size=256, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128,
                                    max_seq_len=32).model_copy(update=model), 256)
    with pytest.raises(ConfigError, match=needle):
        pipeline.check_model(TrainingConfig.model_validate(training), built)


def test_stages_split_the_blocks_evenly_earlier_ones_first():
    assert pipeline.stage_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert pipeline.stage_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert pipeline.stage_layers(4, 4) == [range(i, i + 1) for i in range(4)]


def test_outside_a_process_group_there_is_no_pipeline():
    training = TrainingConfig.model_validate({"method": "pretrain", "parallel": PP, "placement": WORKERS})
    assert pipeline.degree(training) == 1
    assert pipeline.data_rank(training) == (0, 1)
    pipeline.check_group(training)  # nothing to check in one process
