"""One Ray Serve replica: the engine and the OpenAI-compatible app of ``lmforge serve``, inside a Serve actor.

Serve starts :data:`ModelServer` on a Ray worker, which may be another machine: the replica opens the
workspace by its location (a path or an ``s3://`` URL) and resolves the release's pinned source
(``models:/NAME/VERSION`` or a directory) there itself, never through the driver's disk; ``/health`` and
``/v1/models`` report the release (version, alias, run id) as the local server does. The app is built
after the engine loads (Serve's late-bound ingress), so a replica counts as started, and takes traffic,
only once its model is loaded. Serve's health check fails only when the engine lost its backend (a
tensor-parallel worker died: ``check_health``); the engine thread outlives any other failed step,
failing only that step's requests.
Imported on the replicas, by module path: keep it free of driver-side state.
"""

from __future__ import annotations

import os
from typing import Any

from ray import serve

from lmforge.config.serving import ServingConfig
from lmforge.core.workspace import Workspace
from lmforge.serving.api.serve import resolve_model_dir


class _ModelServer:
    """The replica's state: one engine for the release's pinned model, served as ``model_name``."""

    def __init__(self, release: dict[str, str], model_name: str, cfg: dict[str, Any], home: str,
                 tracking_uri: str | None, api_keys: list[str]) -> None:
        from lmforge.serving.engine.engine import Engine  # torch: only on the replicas

        if tracking_uri:  # the registry the driver resolved the version in, whatever this worker's shell says
            os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        self.cfg = ServingConfig.model_validate(cfg)
        self.model_name = model_name
        self.release = release
        self.api_keys = api_keys
        model_dir, _ = resolve_model_dir(release["source"], Workspace.from_env(home))
        self.engine = Engine.load(model_dir, cfg=self.cfg, metrics=_metrics())

    def __serve_build_asgi_app__(self) -> Any:
        from lmforge.serving.api.server import create_app

        return create_app(self.engine, self.model_name, self.cfg, api_key=self.api_keys, release=self.release)

    def check_health(self) -> None:
        """Serve's health check: failing it makes Serve replace the replica."""
        if self.engine.lost is not None:
            raise RuntimeError(f"the engine cannot serve: {self.engine.lost}")

    def __del__(self) -> None:
        # Serve drains the replica's requests (graceful_shutdown_timeout_s) before it gets here.
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(drain_timeout_s=0.0)


def _metrics() -> Any:
    try:
        from lmforge.serving.engine.metrics import EngineMetrics

        return EngineMetrics()
    except ImportError:  # prometheus_client missing: serve without /metrics
        return None


# The Serve deployment class: `serve.ingress()` without an app takes the one __serve_build_asgi_app__ returns.
ModelServer = serve.ingress()(_ModelServer)
