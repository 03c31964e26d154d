"""Configuration: defaults, YAML files, and errors that name the key and the file."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from conftest import REPO, run_cli
from pydantic import ValidationError

from lmforge.config import PipelineConfig, ServingConfig, TrainingConfig, load_config, updated
from lmforge.config.base import Section
from lmforge.core.errors import ConfigError


def test_default_yaml_matches_embedded_defaults():
    assert load_config(REPO / "configs" / "default.yaml") == PipelineConfig()


@pytest.mark.parametrize("name", ["default.yaml", "tiny.yaml", "cluster.yaml", "gpt2-h100.yaml"])
def test_shipped_configs_load(name):
    load_config(REPO / "configs" / name)


def test_partial_file_keeps_other_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  placement:\n    num_workers: 1\n")
    cfg = load_config(path)
    assert cfg.training.placement.num_workers == 1
    assert cfg.model == PipelineConfig().model


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("training:\n  learnin_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "training.learnin_rate" in err.value.cause and str(path) in err.value.cause


def test_invalid_value_names_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hidden_size: 100\n  num_heads: 3\n")
    with pytest.raises(ConfigError, match="divisible"):
        load_config(path)
    path.write_text("training:\n  pretrain: {steps: -1, learning_rate: 0.1}\n")
    with pytest.raises(ConfigError, match=re.escape("training.pretrain.steps")):
        load_config(path)


def test_malformed_and_missing_files(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_configs_are_frozen():
    cfg = PipelineConfig()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.training.placement.num_workers = 3  # type: ignore[misc] - the assignment must fail


def test_cli_config_show_and_schema(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("registry:\n  model_name: my-model\n")
    shown = run_cli(["config", "show", str(path)], tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["registry"]["model_name"] == "my-model"
    schema = run_cli(["config", "schema"], tmp_path)
    assert schema.returncode == 0
    props = json.loads(schema.stdout)["properties"]
    assert set(props) == {"data", "curation", "validation", "tokenize", "model", "training", "evaluation",
                          "registry", "serving", "platform", "tune"}


def test_cli_config_error_has_no_traceback(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("modle: {}\n")
    result = run_cli(["collect", str(path)], tmp_path)
    assert result.returncode == 2
    assert "unknown key 'modle'" in result.stderr and "fix:" in result.stderr
    assert "Traceback" not in result.stderr


def test_old_flat_keys_name_their_new_place(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("training:\n  log_every: 5\n  num_workers: 1\nserving:\n  max_batch_size: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in err.value.cause and "unknown key 'training.log_every'" in err.value.cause
    assert err.value.fix.startswith("training.log_every is now training.logging.every")
    assert "training.num_workers is now training.placement.num_workers" in err.value.fix
    assert "serving.max_batch_size is now serving.scheduler.max_batch_size" in err.value.fix
    assert str(path) in err.value.fix and "other listed" not in err.value.fix
    path.write_text("training:\n  checkpoint_every: 5\n  learnin_rate: 0.1\n")  # a moved key and a typo
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "unknown key 'training.learnin_rate'" in err.value.cause
    assert "training.checkpoint_every is now training.checkpointing.every" in err.value.fix
    assert "correct the other listed key(s)" in err.value.fix


def test_cli_names_a_moved_key_and_its_new_place(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("training:\n  log_every: 5\n")
    result = run_cli(["collect", str(path)], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(path) in result.stderr and "fix: training.log_every is now training.logging.every" in result.stderr


def test_a_serving_config_file_names_a_moved_key(tmp_path):
    from lmforge.serving.api import load_serving_config

    path = tmp_path / "serving.json"
    path.write_text(json.dumps({"kv_cache_mb": 64, "scheduler": {"max_queue": 3}}))
    with pytest.raises(ConfigError) as err:
        load_serving_config(path)
    assert str(path) in err.value.cause and err.value.fix.startswith("kv_cache_mb is now kv_cache.memory_mb")
    path.write_text(json.dumps({"kv_cache": {"memory_mb": 64}, "scheduler": {"max_queue": 3}}))
    assert load_serving_config(path).scheduler.max_queue == 3


@pytest.mark.parametrize("section", [TrainingConfig, ServingConfig])
def test_every_moved_key_points_at_a_field_and_is_one_no_longer(section):
    for old, new in section.moved_keys.items():
        assert old not in section.model_fields
        model: type[Section] = section
        *groups, field = new.split(".")
        for group in groups:
            model = model.model_fields[group].annotation
        assert field in model.model_fields, f"{old} -> {new}"


def test_grouped_sections_round_trip_and_updates_validate():
    training = TrainingConfig(method="full", placement={"num_workers": 1, "use_gpu": True},
                              speed={"compile": True, "compile_scope": "model", "cuda_graphs": True},
                              logging={"every": 3}, checkpointing={"every": 9, "keep": 1})
    # The job passed to training workers is this JSON form.
    assert TrainingConfig.model_validate(json.loads(json.dumps(training.model_dump(mode="json")))) == training
    faster = updated(training, logging={"every": 1})
    assert faster.logging.every == 1 and faster.checkpointing == training.checkpointing
    with pytest.raises(ValueError, match=r"placement\.num_workers: 1"):  # a cross-group rule still holds
        updated(training, placement={"num_workers": 2})
    serving = updated(ServingConfig(adapters={"a": "/x"}), adapters={"b": "/y"}, scheduler={"max_queue": 2})
    assert serving.adapters == {"b": "/y"} and serving.scheduler.max_queue == 2  # a dict field is replaced
