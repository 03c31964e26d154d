"""``training.parallel.strategy: deepspeed``: its typed settings, the rules that span groups, the DeepSpeed JSON
generated from them, and the error when the package is missing (the 2-process ZeRO runs are
tests/integration/test_train_deepspeed.py)."""

from __future__ import annotations

import sys

import pytest

from lmforge.config.training import PhaseConfig, TrainingConfig
from lmforge.core.errors import ConfigError
from lmforge.train import zero

PHASE = PhaseConfig(steps=10, learning_rate=1e-4, batch_size=4, seq_len=64, grad_accum=3)


def _training(**deepspeed) -> TrainingConfig:
    return TrainingConfig.model_validate({"parallel": {"strategy": "deepspeed", "deepspeed": deepspeed},
                                          "placement": {"use_ray": True, "num_workers": 2},
                                          "optimizer": {"grad_clip": 0.5}})


def test_generated_deepspeed_json_follows_the_phase_and_our_settings():
    gpu = zero.deepspeed_config(_training(stage=3, offload_optimizer=True, offload_params=True), PHASE, 2, on_gpu=True)
    assert (gpu["train_micro_batch_size_per_gpu"], gpu["gradient_accumulation_steps"], gpu["train_batch_size"]) == (4, 3, 24)
    assert gpu["gradient_clipping"] == 0.5 and gpu["bf16"] == {"enabled": True}
    assert gpu["managed_gradient_accumulation"] is False  # the loop's one step() per optimizer step
    z = gpu["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert gpu["zero_force_ds_cpu_optimizer"] is False  # torch's AdamW on the host: no compiled CPU Adam
    cpu = zero.deepspeed_config(_training(stage=2), PHASE, 2, on_gpu=False)
    assert cpu["bf16"] == {"enabled": False} and cpu["zero_optimization"]["stage"] == 2
    assert "offload_optimizer" not in cpu["zero_optimization"] and not cpu["zero_optimization"]["overlap_comm"]


@pytest.mark.parametrize("settings,needle", [
    ({"placement": {"use_ray": False}}, "use_ray"),
    ({"method": "qlora"}, "4-bit"),
    ({"parallel": {"deepspeed": {"stage": 2, "offload_params": True}}}, "stage: 3"),
    ({"parallel": {"deepspeed": {"stage": 1}}}, "stage"),
    ({"parallel": {"deepspeed": {"bucket": 5}}}, "bucket"),  # unknown key
    ({"speed": {"compile": True}}, "speed.compile"),
    ({"parallel": {"tensor_parallel": 2}}, "tensor_parallel"),
])
def test_bad_deepspeed_settings_fail_at_config_time(settings, needle):
    data = {"parallel": {"strategy": "deepspeed"}, "placement": {"use_ray": True, "num_workers": 2}}
    for key, value in settings.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    data["parallel"] = {"strategy": "deepspeed", **data["parallel"]}
    with pytest.raises(ValueError, match=needle):
        TrainingConfig.model_validate(data)


def test_missing_package_is_a_config_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what find_spec reports for a package that is not there
    with pytest.raises(ConfigError) as caught:
        zero.require(_training())
    assert "pip install 'lmforge[deepspeed]'" in caught.value.fix
    zero.require(TrainingConfig())  # ddp needs no deepspeed


def test_early_stopping_is_refused_before_the_engine_starts():
    import torch

    training = _training().model_copy(update={"validation": _training().validation.model_copy(
        update={"early_stopping_patience": 2})})
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="early_stopping_patience"):
        zero.wrap(model, torch.optim.AdamW(model.parameters()), PHASE, training, torch.device("cpu"))
