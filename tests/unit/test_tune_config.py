"""The tune section's checks (bad keys, distributions and bounds fail when the file is read, naming the
key and the fix) and the search-space helpers; no Ray, no training."""

from __future__ import annotations

import importlib.util

import pytest

from lmforge.config import parse_config
from lmforge.config.tune import TuneConfig
from lmforge.core.errors import ConfigError
from lmforge.stages.tune import check_space
from lmforge.tune.search import check_searcher
from lmforge.tune.space import default_metric, samplers, validations, with_values


def _space(space: dict) -> dict:
    return {"tune": {"space": space}}


@pytest.mark.parametrize("space,match", [
    ({"training.finetune.lr": {"uniform": [1, 2]}}, "training.finetune has no key 'lr'"),
    ({"data.sources": {"choice": [[]]}}, "keys of the training or model section"),
    ({"training.lora": {"choice": [1]}}, "is a group: name one of its keys"),
    ({"training.lora.r": {"uniform": [4, 8]}}, "takes whole numbers: use randint"),
    ({"training.lora.r": {"randint": [0, 8]}}, "0 is not a valid value"),
    ({"training.finetune.learning_rate": {"uniform": [-1.0, 1.0]}}, "-1.0 is not a valid value"),
    ({"training.finetune.learning_rate": {"loguniform": [0.0, 1.0]}}, "must be above 0"),
    ({"training.finetune.learning_rate": {"uniform": [1.0, 0.5]}}, "must be below high"),
    ({"training.finetune.learning_rate": {"gauss": [1.0, 2.0]}},
     "unknown key 'tune.space.training.finetune.learning_rate.gauss'"),
    ({"training.finetune.learning_rate": {"uniform": [0.1, 0.2], "choice": [0.1]}}, "exactly one distribution"),
    ({"training.method": {"choice": ["lora", "bogus"]}}, "'bogus' is not a valid value"),
])
def test_bad_space_is_a_config_error(space, match):
    with pytest.raises(ConfigError, match=match) as info:
        parse_config(_space(space))
    assert "lmforge config schema" in info.value.fix


def test_a_bound_the_whole_config_refuses_fails_before_any_work():
    # warmup may exceed steps alone, but speed.fp8 with method lora is refused by the training section.
    raw = parse_config({"training": {"speed": {"fp8": True}, "method": "full"},
                        **_space({"training.method": {"choice": ["full", "lora"]}})}).model_dump(mode="json")
    with pytest.raises(ConfigError, match="fp8") as info:
        check_space(raw)
    assert "narrow the bounds of tune.space.training.method" in info.value.fix


def test_space_helpers():
    config = parse_config({"training": {"method": "pretrain", "pretrain": {"steps": 10, "learning_rate": 0.1},
                                        "validation": {"every": 3}},
                           **_space({"training.pretrain.steps": {"randint": [5, 31]},
                                     "training.lora.r": {"choice": [4, 8]}})})
    assert default_metric(config.training) == "pretrain_val_loss"
    assert validations(config.training) == 2 + 3  # before, at 3, 6, 9, after the last
    assert check_space(config.model_dump(mode="json")) == 2 + 9  # steps up to 30: 3 ... 27
    raw = with_values(config.model_dump(mode="json"), {"training.lora.r": 8, "training.pretrain.steps": 7})
    assert raw["training"]["lora"]["r"] == 8 and raw["training"]["pretrain"]["steps"] == 7
    assert set(samplers(config.tune.space)) == {"training.pretrain.steps", "training.lora.r"}
    assert default_metric(parse_config({}).training) == "finetune_val_loss"


@pytest.mark.skipif(importlib.util.find_spec("optuna") is not None, reason="optuna is installed")
def test_optuna_missing_names_the_install():
    with pytest.raises(ConfigError, match="optuna") as info:
        check_searcher(TuneConfig(searcher="optuna"))
    assert "pip install optuna" in info.value.fix


def test_empty_space_names_the_fix(tmp_path):
    from lmforge.core.workspace import Workspace
    from lmforge.stages.tune import tune

    with pytest.raises(ConfigError, match=r"tune\.space is empty"):
        tune(parse_config({}), Workspace(tmp_path))
