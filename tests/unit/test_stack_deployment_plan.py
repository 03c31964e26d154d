"""The stack's deployments as planned (flows/deployments.py, no server): what runs when, the data-arrival
trigger off unless enabled, and infra/prefect.yaml registering the same deployments in the image."""

from __future__ import annotations

import re
from importlib.metadata import version

import pytest
import yaml
from conftest import REPO

from flows.deployments import RETRAIN_TRIGGER, plan
from lmforge.config import PipelineConfig
from lmforge.config.platform import PlatformConfig
from lmforge.core.errors import ConfigError
from lmforge.core.workspace import Workspace

ON = PipelineConfig(platform=PlatformConfig(retrain_on_new_data=True, watch_interval_s=30, retrain_debounce_s=600,
                                            schedule_cron="0 4 * * 1"))


def _by_name(config: PipelineConfig, ws: Workspace) -> dict:
    return {p.name: p for p in plan(config, ws)}


def test_the_retrain_runs_from_the_champion_on_the_cron_and_on_new_data(tmp_path):
    ws = Workspace(tmp_path / "home")
    planned = _by_name(ON, ws)
    assert set(planned) == {"pipeline", "retrain", "tune", "deploy", "watch"}
    retrain = planned["retrain"]
    assert retrain.entrypoint == "flows/pipeline.py:pipeline" and retrain.parameters["continue_from"] == "champion"
    assert [s.cron for s in retrain.schedules] == ["0 4 * * 1"]
    (trigger,) = retrain.triggers
    assert trigger.enabled and trigger.name == RETRAIN_TRIGGER
    assert trigger.expect == {"lmforge.data.collected"} and trigger.threshold == 1
    assert trigger.within.total_seconds() == 600 and trigger.posture == "Reactive"
    # Only this workspace's events: another workspace on the same Prefect server retrains its own model.
    assert trigger.match.model_dump() == {"prefect.resource.id": f"lmforge.workspace.{ws.home}"}
    watch = planned["watch"]
    assert [(s.interval.total_seconds(), s.active) for s in watch.schedules] == [(30, True)]
    assert watch.parameters == {"data": ON.data.model_dump(mode="json")}
    assert planned["pipeline"].parameters["continue_from"] == "auto"
    assert planned["pipeline"].parameters["config"] == ON.model_dump(mode="json")


def test_data_arrival_retraining_is_off_unless_enabled(tmp_path):
    planned = _by_name(PipelineConfig(), Workspace(tmp_path / "home"))
    assert [t.enabled for t in planned["retrain"].triggers] == [False]
    assert [s.active for s in planned["watch"].schedules] == [False]
    assert [s.active for s in planned["retrain"].schedules] == [True]  # the weekly retrain stays, as in `lmforge ui`


@pytest.mark.parametrize(("key", "value"), [("watch_interval_s", 1), ("retrain_debounce_s", 0),
                                            ("retrain_on_new_date", True)])
def test_bad_platform_keys_are_errors(key, value):
    from lmforge.config.loader import parse_config

    with pytest.raises(ConfigError, match=key):
        parse_config({"platform": {key: value}})


def test_infra_prefect_yaml_registers_the_same_deployments_in_the_image(tmp_path):
    spec = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
    assert spec["prefect-version"] == version("prefect")  # the client's exact version, as the compose server's
    workdir = re.findall(r"^WORKDIR (\S+)", (REPO / "docker" / "Dockerfile").read_text(), re.M)[-1]
    assert spec["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": workdir}}]
    planned = _by_name(PipelineConfig(), Workspace(tmp_path / "home"))
    declared = {d["name"]: d for d in spec["deployments"]}
    assert set(declared) == set(planned)
    for name, p in planned.items():
        d = declared[name]
        assert d["entrypoint"] == p.entrypoint and d["work_pool"] == {"name": "lmforge"}
        assert d.get("parameters", {}).get("continue_from") == p.parameters.get("continue_from")
        limit = d.get("concurrency_limit")
        assert ((limit["limit"], limit["collision_strategy"]) if limit else None) == p.concurrency
        assert [s.get("cron") for s in d.get("schedules", [])] == [getattr(s, "cron", None) for s in p.schedules]
        assert [s.get("active", True) for s in d.get("schedules", [])] == [s.active for s in p.schedules]
        assert [(t["expect"], t["enabled"], t["threshold"], t["posture"]) for t in d.get("triggers", [])] == [
            (sorted(t.expect), t.enabled, t.threshold, t.posture) for t in p.triggers]


def test_a_bad_cron_names_the_key_and_the_form(tmp_path):
    config = PipelineConfig(platform=PlatformConfig(schedule_cron="every sunday"))
    with pytest.raises(ConfigError) as err:
        plan(config, Workspace(tmp_path / "home"))
    assert "platform.schedule_cron 'every sunday'" in err.value.cause and "'0 3 * * 0'" in err.value.fix
