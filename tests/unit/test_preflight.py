"""The pre-flight resource check (issue 20): the closed-form parameter count matches the built model, the
shipped configs pass, and a config far beyond the machine fails before any work, naming the key to change.
"""

from __future__ import annotations

import pytest
from conftest import REPO

from lmforge.cli import main
from lmforge.config import PipelineConfig, load_config, parse_config
from lmforge.config.model import ModelConfig
from lmforge.config.training import TrainingConfig
from lmforge.core.errors import ConfigError
from lmforge.model.info import GIB, describe, estimate_parameters
from lmforge.model.preflight import preflight

HOST_64G = ("host (CPU) memory", 64 * GIB)


@pytest.mark.parametrize("model", [
    ModelConfig(vocab_size=384, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64),
    ModelConfig(vocab_size=300, vocab_multiple=64, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=4,
                intermediate_size=96, tie_embeddings=False),
    ModelConfig(architecture="gpt2", vocab_size=384, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
                intermediate_size=128, max_seq_len=64),
    ModelConfig(vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4,
                intermediate_size=5632, max_seq_len=2048, tie_embeddings=False),
], ids=["tiny-llama", "untied-padded", "gpt2", "tinyllama-1b"])
def test_the_closed_form_count_matches_the_meta_model(model):
    assert estimate_parameters(model) == describe(model, TrainingConfig(method="pretrain")).params_total


@pytest.mark.parametrize("name", ["default.yaml", "tiny.yaml"])
def test_the_shipped_configs_pass_on_a_modest_machine(name):
    result = preflight(load_config(REPO / "configs" / name), ("host (CPU) memory", 4 * GIB))
    assert result is not None and result.warnings == [] and result.params > 0


def test_the_embedded_defaults_pass_on_this_machine():
    result = preflight(PipelineConfig())
    assert result is not None and result.warnings == []


def test_a_model_far_beyond_the_machine_names_the_model_keys():
    config = parse_config({"model": {"hidden_size": 16384, "num_layers": 120, "num_heads": 128, "num_kv_heads": 8,
                                     "intermediate_size": 53248}, "training": {"method": "full"}})
    with pytest.raises(ConfigError) as err:
        preflight(config, HOST_64G)
    assert "model.hidden_size" in err.value.fix and "GiB" in err.value.cause and "parameters" in err.value.cause


def test_a_batch_far_beyond_the_machine_names_the_batch_keys():
    config = parse_config({"training": {"pretrain": {"batch_size": 4096, "seq_len": 8192}}})
    with pytest.raises(ConfigError) as err:
        preflight(config, HOST_64G)
    assert "training.pretrain.batch_size" in err.value.fix and "gradient_checkpointing" in err.value.fix
    assert "num_workers" in err.value.fix  # two CPU workers share the host


def test_close_to_the_limit_is_a_warning():
    config = PipelineConfig()
    need = preflight(config, HOST_64G).train_bytes
    result = preflight(config, ("host (CPU) memory", int(need / 0.9)))
    assert result.warnings and "close to the limit" in result.warnings[0]


def test_serving_far_beyond_the_machine_names_the_serving_keys():
    config = parse_config({"serving": {"kv_cache": {"memory_mb": 1_000_000}}})
    with pytest.raises(ConfigError) as err:
        preflight(config, HOST_64G)
    assert "serving" in err.value.cause and "serving.kv_cache.memory_mb" in err.value.fix


def test_a_base_model_is_not_estimated_here():
    assert preflight(parse_config({"model": {"base_model": "/nonexistent/model"}})) is None


def test_lmforge_train_refuses_before_any_work(tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("LMFORGE_HOME", str(home))
    config = tmp_path / "huge.yaml"
    config.write_text("model: {hidden_size: 65536, num_layers: 1024, num_heads: 64, num_kv_heads: 8, "
                      "intermediate_size: 200000}\ntraining: {method: full}\n")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "model.hidden_size" in err
    assert not (home / "tokenizer").exists()


def test_a_run_longer_than_any_plan_names_the_steps_key():
    # A small model that fits, asked for 1e8 steps of 64 x 512 tokens: years even at the CPUs' peak rate.
    config = parse_config({"model": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 4,
                                     "intermediate_size": 512, "max_seq_len": 512},
                           "training": {"pretrain": {"steps": 100_000_000, "batch_size": 64, "seq_len": 512}}})
    with pytest.raises(ConfigError) as err:
        preflight(config, HOST_64G)
    assert "training.pretrain.steps is 100,000,000" in err.value.cause and "hours" in err.value.cause
    assert "lower training.pretrain.steps" in err.value.fix


def test_the_time_estimate_is_a_lower_bound_that_grows_with_steps():
    short = preflight(parse_config({"training": {"pretrain": {"steps": 10}}}), HOST_64G)
    long = preflight(parse_config({"training": {"pretrain": {"steps": 1000}}}), HOST_64G)
    assert short is not None and long is not None and 0 < short.train_hours < long.train_hours
    assert not any("hours" in w for w in long.warnings)  # the shipped model at 1000 steps is minutes
