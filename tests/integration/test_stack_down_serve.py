"""`lmforge stack down` ends the Serve application deployed on the stack's Ray head: its record
(``serving/ray_serve.json``) goes, so a later deploy or rollback does not take it for running, and the model
version it served loses its deployment tags and gets ``lmforge.deploy.retired_at``.

A real Ray head (``lmforge stack up``'s, on free ports, token authentication), a real MLflow registry (the
workspace's SQLite) tagged by the deploy stage's own function; the application's record in the shape
``deploy_app`` writes (a real Serve deployment is minutes here: test_stack_lifecycle.py runs one end to end).
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from lmforge.config.pipeline import PipelineConfig
from lmforge.core.workspace import Workspace
from lmforge.serving.ray_serve import read_app
from lmforge.stack import control
from lmforge.stack.roles import Options
from lmforge.tracking.deployment import TAG_DEPLOYED_AT, TAG_ENDPOINT, TAG_RETIRED_AT, mark_deployed
from lmforge.tracking.mlflow_tracker import mlflow_client

pytestmark = pytest.mark.slow  # a Ray head's start: tens of seconds on a busy 2-core machine

NAME = "stack-down-demo"


def _record(ws: Workspace, release: dict[str, str], address: str) -> None:
    app = {"endpoint": "http://127.0.0.1:8000", "model_name": NAME, "model_ref": release["model_ref"],
           "version": release["version"], "action": "deployed", "app_name": "lmforge", "address": address,
           "release": release}
    ws.serving_dir.mkdir(parents=True, exist_ok=True)
    ws.serve_app_record.write_text(json.dumps({
        "platform": "ray", "app": app, "model_ref": release["model_ref"], "model_name": NAME,
        "endpoint": app["endpoint"], "release": release, "digest": "0" * 16, "serving_config": {}}))


def test_down_forgets_the_serve_app_on_its_head_and_retires_the_version(tmp_path: Path, monkeypatch) -> None:
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))  # this test's head's own token
    ws = Workspace(tmp_path / "home").ensure()
    client = mlflow_client(ws)
    client.create_registered_model(NAME)
    model = tmp_path / "model"
    model.mkdir()
    version = client.create_model_version(NAME, str(model)).version
    release = {"model_ref": f"models:/{NAME}@champion", "registered_name": NAME, "version": str(version),
               "alias": "champion", "run_id": "", "source": f"models:/{NAME}/{version}"}
    mark_deployed(ws, release, "http://127.0.0.1:8000")

    states, _ = control.up(ws, PipelineConfig(), Options(ray_port=0, ray_cpus=1, roles=("ray-head",)))
    head = states["ray-head"].url
    assert head
    try:
        _record(ws, release, head)
    finally:
        stopped = control.down(ws)
    assert stopped == ["ray-head"]
    assert read_app(ws) is None and not ws.serve_app_record.exists()
    tags = client.get_model_version(NAME, str(version)).tags
    assert TAG_RETIRED_AT in tags and TAG_DEPLOYED_AT not in tags and TAG_ENDPOINT not in tags, tags


def test_down_leaves_a_serve_app_of_another_cluster_alone(tmp_path: Path, monkeypatch) -> None:
    """An application on a cluster the stack did not start (serving.ray.address) outlives the stack."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    ws = Workspace(tmp_path / "home").ensure()
    release = {"model_ref": str(tmp_path), "registered_name": "", "version": "local", "alias": "", "run_id": "",
               "source": str(tmp_path)}
    control.up(ws, PipelineConfig(), Options(ray_port=0, ray_cpus=1, roles=("ray-head",)))
    try:
        _record(ws, release, "10.0.0.7:6379")
    finally:
        assert control.down(ws) == ["ray-head"]
    assert read_app(ws) is not None and read_app(ws)["app"]["address"] == "10.0.0.7:6379"
