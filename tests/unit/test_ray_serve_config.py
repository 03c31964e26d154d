"""`serving.platform: ray` before any Ray runs: its config is checked, and a missing cluster names the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from lmforge.config.serving import ServingConfig
from lmforge.core.errors import ServingError
from lmforge.core.workspace import Workspace


def test_ray_section_defaults_and_checks() -> None:
    cfg = ServingConfig.model_validate({"platform": "ray", "ray": {"num_replicas": 2}})
    assert (cfg.platform, cfg.ray.num_replicas, cfg.ray.http_port, cfg.ray.autoscaling) == ("ray", 2, 8000, None)
    assert ServingConfig().platform == "local"
    scaled = ServingConfig.model_validate({"ray": {"autoscaling": {"min_replicas": 1, "max_replicas": 3}}})
    assert scaled.ray.autoscaling is not None and scaled.ray.autoscaling.target_ongoing_requests == 2.0
    for bad, words in (({"num_replicas": 2, "autoscaling": {"max_replicas": 3}}, "either num_replicas"),
                       ({"autoscaling": {"min_replicas": 4, "max_replicas": 2}}, "must not exceed"),
                       ({"replicas": 2}, "replicas"), ({"app_name": "a b"}, "app_name")):
        with pytest.raises(ValidationError, match=words):
            ServingConfig.model_validate({"ray": bad})
    with pytest.raises(ValidationError, match="platform"):
        ServingConfig.model_validate({"platform": "k8s"})


def test_no_cluster_names_the_fix(tmp_path: Path, monkeypatch) -> None:
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("this process already joined a Ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    from lmforge.serving.ray_serve.app import cluster_address

    with pytest.raises(ServingError) as err:
        cluster_address(ServingConfig(platform="ray"), Workspace(tmp_path / "home"))
    assert "lmforge stack up" in err.value.fix and "serving.ray.address" in err.value.fix
    cfg = ServingConfig.model_validate({"platform": "ray", "ray": {"address": "127.0.0.1:1"}})
    assert cluster_address(cfg, Workspace(tmp_path / "home")) == "127.0.0.1:1"


def test_serving_ray_becomes_the_serve_deployment_options() -> None:
    pytest.importorskip("ray")
    from lmforge.serving.ray_serve.app import serve_deployment

    fixed = serve_deployment(ServingConfig.model_validate(
        {"scheduler": {"max_batch_size": 6}, "server": {"drain_timeout_s": 12},
         "ray": {"num_replicas": 3, "num_cpus": 2, "num_gpus": 0.5, "max_surge_percent": 50}}))
    assert fixed.name == "server" and fixed.num_replicas == 3
    assert fixed.ray_actor_options == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert fixed.max_ongoing_requests == 6  # scheduler.max_batch_size: the rest wait in Serve's queue
    config = fixed._deployment_config  # Serve's Deployment shows the surge and drain settings only here
    assert (config.max_surge_percent, config.graceful_shutdown_timeout_s) == (50, 12)
    scaled = serve_deployment(ServingConfig.model_validate(
        {"ray": {"autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4}}}))
    autoscaling = scaled._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (1, 3, 4)
