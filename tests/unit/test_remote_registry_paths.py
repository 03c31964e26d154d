"""Where the stages after training keep things on an object-store workspace: MLflow's artifacts
(``platform.mlflow_artifacts`` and its default), the flags of the MLflow server `lmforge ui` starts,
hand-offs on the store, and the locations hand-offs record, read back from another machine."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lmforge.config import PipelineConfig
from lmforge.config.loader import parse_config
from lmforge.config.platform import PlatformConfig
from lmforge.core.errors import ConfigError
from lmforge.core.storage.recorded import recorded_key
from lmforge.core.workspace import Workspace
from lmforge.tracking.mlflow_tracker import artifacts_destination
from lmforge.ui import artifact_flags


def _remote(tmp_path, monkeypatch, url="s3://bucket/team/ws") -> Workspace:
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    return Workspace.from_env(url)


def test_artifacts_default_beside_the_workspace_and_the_setting_wins(tmp_path, monkeypatch):
    local = Workspace(tmp_path / "home")
    assert artifacts_destination(local) == local.mlflow_artifacts_uri
    remote = _remote(tmp_path, monkeypatch)
    assert artifacts_destination(remote) == "s3://bucket/team/ws/mlflow-artifacts"
    chosen = PlatformConfig(mlflow_artifacts="gs://other/mlflow/")
    assert artifacts_destination(local, chosen) == artifacts_destination(remote, chosen) == "gs://other/mlflow"


def test_mlflow_server_serves_artifacts_on_a_store_and_keeps_a_local_workspace_as_it_was(tmp_path, monkeypatch):
    local = Workspace(tmp_path / "home")
    assert artifact_flags(local, PipelineConfig()) == [
        "--default-artifact-root", local.mlflow_artifacts_uri, "--no-serve-artifacts"]
    remote = _remote(tmp_path, monkeypatch)
    assert artifact_flags(remote, PipelineConfig()) == [
        "--artifacts-destination", "s3://bucket/team/ws/mlflow-artifacts", "--serve-artifacts"]
    config = PipelineConfig.model_validate({"platform": {"mlflow_artifacts": "s3://b2/mlflow"}})
    assert artifact_flags(local, config) == ["--artifacts-destination", "s3://b2/mlflow", "--serve-artifacts"]


@pytest.mark.parametrize(("value", "words"), [("/tmp/artifacts", "is not a URL"),
                                              ("s3://key:secret@bucket/mlflow", "credentials")])
def test_bad_mlflow_artifacts_settings_are_named(value, words):
    with pytest.raises(ValidationError, match=words):
        PlatformConfig(mlflow_artifacts=value)
    with pytest.raises(ConfigError, match=words) as caught:  # as a user sees it from a config file
        parse_config({"platform": {"mlflow_artifacts": value}}, "config.yaml")
    assert "secret" not in str(caught.value.cause)  # the error never repeats a credential


def test_state_of_a_remote_workspace_is_on_its_store(tmp_path, monkeypatch):
    ws = _remote(tmp_path, monkeypatch, "memory://lmforge-state-test/ws")
    import lmforge.core.storage as storage

    assert ws.read_state("train") is None
    ws.write_state("train", {"run_id": "r1"})
    assert ws.read_state("train") == {"run_id": "r1"}
    assert storage.open_store(ws).read_json("state/train.json") == {"run_id": "r1"}
    assert not ws.state_dir.exists()  # nothing on this machine's side


def test_recorded_locations_map_to_keys_from_any_machine(tmp_path, monkeypatch):
    ws = _remote(tmp_path, monkeypatch)
    assert recorded_key(ws, ws.runs_dir / "r1" / "model") == "runs/r1/model"
    # The same workspace's side on another machine (another LMFORGE_CACHE) names the same key.
    elsewhere = f"/other/cache/homes/{ws.home.name}/runs/r1/model"
    assert recorded_key(ws, elsewhere) == "runs/r1/model"
    assert recorded_key(ws, "s3://bucket/team/ws/eval/x.json") == "eval/x.json"
    assert recorded_key(ws, "/data/models/mine") is None
    assert recorded_key(ws, "s3://bucket/team/ws2/eval/x.json") is None
