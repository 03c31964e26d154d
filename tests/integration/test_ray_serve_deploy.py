"""`serving.platform: ray`: the deploy stage on a real local Ray Serve, from a real MLflow registry on SQLite.

Two replicas of a tiny model serve ``models:/NAME@champion``; a deploy with nothing moved does nothing;
the alias moves to version 2 and the deploy rolls while a thread sends requests without pause (every
answer must be a 200); ``lmforge rollback``'s stage rolls back to version 1; stop deletes the application.
Slow: each Serve roll starts two fresh replica processes that import torch and load the model (about
40 s each on the shared 2-core machine).
"""

from __future__ import annotations

import logging
import os
import time

import httpx
import pytest
from conftest import free_port
from helpers import make_tiny_model_dir
from stack_runs import SteadyLoad

from lmforge.config.platform import PlatformConfig
from lmforge.config.registry import RegistryConfig
from lmforge.config.serving import ServingConfig
from lmforge.core.workspace import Workspace
from lmforge.serving.ray_serve import read_app
from lmforge.stages.deploy import deploy, stop
from lmforge.stages.register import register
from lmforge.stages.rollback import rollback
from lmforge.tracking.alias_history import record_move
from lmforge.tracking.deployment import TAG_DEPLOYED_AT, TAG_RETIRED_AT
from lmforge.tracking.mlflow_tracker import mlflow_client

pytestmark = pytest.mark.slow
NAME = "ray-tiny"
URI = f"models:/{NAME}@champion"


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    # 4 logical CPUs: two replicas plus two surge replicas during a roll, one CPU each. A Ray an earlier test
    # module of this worker process left running (its stage started it in-process) is stopped first.
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A workspace whose registry holds NAME versions 1 and 2 (the same tiny model), champion -> 1."""
    saved = {k: os.environ.pop(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI") if k in os.environ}
    root = tmp_path_factory.mktemp("ray-serve")
    ws = Workspace(root / "home").ensure()
    model_dir = make_tiny_model_dir(root / "model")
    for _ in range(2):
        register(RegistryConfig(model_name=NAME, experiment="ray-serve"), PlatformConfig(), ws, model_dir=model_dir,
                 params={}, metrics={"eval_loss": 1.0}, history=[], dataset_inputs=[], tags={})
    client = mlflow_client(ws)
    client.set_registered_model_alias(NAME, "champion", "1")
    record_move(client, NAME, "champion", "1", None, by="test")
    yield ws, client
    os.environ.update(saved)


def _served_version(endpoint: str) -> str:
    card = httpx.get(f"{endpoint}/v1/models", timeout=10).json()["data"][0]
    assert card["id"] == NAME
    return str(card["metadata"]["version"])


def test_two_replicas_roll_to_a_moved_alias_without_a_failed_request(ray_cluster, registry) -> None:
    ws, client = registry
    cfg = ServingConfig.model_validate({
        "platform": "ray", "max_new_tokens": 8, "server": {"startup_timeout_s": 300, "drain_timeout_s": 10},
        "ray": {"num_replicas": 2, "http_port": free_port()},
    })
    first = deploy(cfg, URI, ws, NAME)
    try:
        assert (first.action, first.version) == ("deployed", "1")
        assert first.endpoint == f"http://127.0.0.1:{cfg.ray.http_port}" and isinstance(first.probe_response, str)
        assert _served_version(first.endpoint) == "1"
        assert httpx.get(f"{first.endpoint}/health").json()["version"] == "1"
        assert client.get_model_version(NAME, "1").tags.get(TAG_DEPLOYED_AT)
        from ray import serve

        replicas = serve.status().applications["lmforge"].deployments["server"].replica_states
        assert replicas == {"RUNNING": 2}

        started = time.perf_counter()
        again = deploy(cfg, URI, ws, NAME)  # the alias did not move: nothing happens
        assert again.action == "unchanged" and again.endpoint == first.endpoint
        assert time.perf_counter() - started < 10

        client.set_registered_model_alias(NAME, "champion", "2")
        record_move(client, NAME, "champion", "2", "1", by="test")
        with SteadyLoad(first.endpoint, NAME) as load:
            time.sleep(1)
            rolled = deploy(cfg, URI, ws, NAME)
            time.sleep(1)
        assert (rolled.action, rolled.version, rolled.endpoint) == ("rolled", "2", first.endpoint)
        assert set(load.outcomes) == {"200"} and load.outcomes["200"] > 10, load.outcomes
        assert _served_version(first.endpoint) == "2"
        assert client.get_model_version(NAME, "2").tags.get(TAG_DEPLOYED_AT)
        assert client.get_model_version(NAME, "1").tags.get(TAG_RETIRED_AT)

        back = rollback(RegistryConfig(model_name=NAME), None, ws)  # `lmforge rollback`: the application follows
        assert back.to_version == "1" and back.deployment["action"] == "redeployed", back.deployment
        assert back.deployment["rollout"] == "rolled" and _served_version(first.endpoint) == "1"
    finally:
        assert stop(ws) is True
    assert read_app(ws) is None and stop(ws) is False
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{first.endpoint}/health", timeout=5).raise_for_status()

