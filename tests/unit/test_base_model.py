"""Where a run starts from: the continue_from rule (pure), a plain base passing through untouched, and the
flow parameter the Prefect UI form shows. The registry side (downloads, lineage, errors) is in
tests/integration/test_retrain_from_champion.py, against real MLflow."""

from __future__ import annotations

import pytest
from tiny_assets import build_model_dir

from lmforge.config.model import ModelConfig
from lmforge.core.errors import RegistryError
from lmforge.core.workspace import Workspace
from lmforge.stages.base_model import choose_base, is_registry_uri, resolve_base

CHAMPION = "models:/demo@champion"


@pytest.mark.parametrize(("configured", "continue_from", "scheduled", "champion", "expected"), [
    (None, "auto", True, CHAMPION, CHAMPION),  # the weekly run keeps improving the champion
    (None, "auto", True, None, None),  # no champion yet: the first model trains from scratch
    (None, "auto", False, CHAMPION, None),  # `lmforge run` / a run started by hand: the config as written
    ("/my/base", "auto", True, CHAMPION, "/my/base"),  # an explicit base wins over auto
    ("/my/base", "scratch", True, CHAMPION, "/my/base"),
    (None, "scratch", True, CHAMPION, None),
    (None, "champion", False, CHAMPION, CHAMPION),
    ("/my/base", "champion", True, CHAMPION, CHAMPION),  # asked for by name: replaces the configured base
])
def test_choose_base(configured, continue_from, scheduled, champion, expected):
    assert choose_base(configured, continue_from, scheduled, champion) == expected


def test_choose_champion_without_one_names_the_fix():
    with pytest.raises(RegistryError, match="no registered version holds the alias") as info:
        choose_base(None, "champion", True, None)
    assert "continue_from: scratch" in info.value.fix


def test_a_plain_base_is_not_resolved(tmp_path):
    ws = Workspace(tmp_path / "home")
    local = ModelConfig(base_model=str(build_model_dir(tmp_path / "base")))
    for model in (local, ModelConfig()):
        base = resolve_base(model, ws)
        assert base.model is model and base.uri is None and base.lineage() == {} and base.path is None
    assert not (tmp_path / "home").exists()  # no MLflow database was created for it
    assert [is_registry_uri(v) for v in (CHAMPION, "models:/demo/3", "/dir", None)] == [True, True, False, False]


def test_continue_from_is_a_documented_choice_in_the_flow_form():
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import pipeline

    field = parameter_schema(pipeline.fn).properties["continue_from"]
    assert field["enum"] == ["auto", "champion", "scratch"] and field["default"] == "auto"
    assert "scheduled run continues from the" in field["description"]
