"""Configuration: defaults, YAML files, and errors that name the key and the file."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import REPO, run_cli
from lmforge.config import PipelineConfig, load_config
from lmforge.core.errors import ConfigError


def test_default_yaml_matches_embedded_defaults():
    assert load_config(REPO / "configs" / "default.yaml") == PipelineConfig()


@pytest.mark.parametrize("name", ["default.yaml", "tiny.yaml", "cluster.yaml", "gpt2-h100.yaml"])
def test_shipped_configs_load(name):
    load_config(REPO / "configs" / name)


def test_partial_file_keeps_other_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  num_workers: 1\n")
    cfg = load_config(path)
    assert cfg.training.num_workers == 1
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
    with pytest.raises(ConfigError, match="training.pretrain.steps"):
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
    with pytest.raises(Exception):
        cfg.training.num_workers = 3  # type: ignore[misc]


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
                          "registry", "serving", "platform"}


def test_cli_config_error_has_no_traceback(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("modle: {}\n")
    result = run_cli(["collect", str(path)], tmp_path)
    assert result.returncode == 2
    assert "unknown key 'modle'" in result.stderr and "fix:" in result.stderr
    assert "Traceback" not in result.stderr
