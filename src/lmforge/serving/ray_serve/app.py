"""Deploy, roll and remove the Ray Serve application that serves a model (``serving.platform: ray``).

    from lmforge.serving.ray_serve import deploy_app, stop_app
    release = resolve_release("models:/lmforge-demo@champion", ws)  # lmforge.tracking.deployment
    app = deploy_app(cfg.serving, release, ws, "lmforge-demo")
    stop_app(ws)

The deploy stage (``lmforge deploy``, ``lmforge rollback``) calls these when ``serving.platform`` is ``ray``,
with the *release* it resolved: the version an alias names now, pinned (``release["source"]`` is
``models:/NAME/VERSION``), so every replica loads exactly that version even if the alias moves meanwhile;
each replica reports it in ``/health`` and ``/v1/models``. :func:`deploy_app` compares the release and the
serving config with what this workspace deployed last. Unchanged and still running: nothing happens.
Changed: the application is (re)deployed under its fixed name and route, and Serve rolls it: with
``serving.ray.max_surge_percent`` new replicas start beside the old ones, load the model and pass the
health check before old replicas stop taking requests and drain (``serving.server.drain_timeout_s``).
Serve's HTTP proxy keeps listening on ``serving.ray.http_port`` throughout, so clients see one endpoint.

The application lives in the Ray cluster, not in this process: the cluster must outlive the command
(the Ray head of ``lmforge stack up``, or ``serving.ray.address`` / ``RAY_ADDRESS``). A process that
already joined a Ray (tests, benchmarks) deploys on that one. ``ray_serve.json`` in the workspace's
serving directory records what runs where, for the next deploy, ``lmforge rollback`` and :func:`stop_app`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

from lmforge.config.serving import ServingConfig
from lmforge.core.errors import ServingError
from lmforge.core.workspace import Workspace, atomic_write_json
from lmforge.serving.api.launch import check_exposure, parse_keys
from lmforge.serving.api.serve import resolve_model_dir

DEPLOYMENT = "server"  # the Serve deployment's name inside the application


@dataclass(frozen=True)
class RayApp:
    """The Serve application after :func:`deploy_app`: where it answers and what it serves."""

    endpoint: str  # base URL of Serve's HTTP proxy (OpenAI routes under /v1)
    model_name: str
    model_ref: str  # what was asked for, e.g. models:/lmforge-demo@champion
    version: str  # the registry version, or "local" for a directory
    action: str  # deployed | rolled | unchanged
    app_name: str
    address: str  # the Ray cluster (GCS address)
    release: dict[str, str]  # lmforge.tracking.deployment's release: what the replicas load and report

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def deploy_app(cfg: ServingConfig, release: dict[str, str], ws: Workspace, model_name: str) -> RayApp:
    """Serve ``release`` as the Serve application ``cfg.ray.app_name``; roll it only when what it serves changed."""
    keys = parse_keys(os.environ.get("LMFORGE_API_KEY"))
    check_exposure(cfg.server.host, keys, cfg)
    # Loaded here once: a model that cannot be served fails now, with the registry's own error, and replicas
    # on this machine find it in the workspace's cache instead of downloading it side by side.
    resolve_model_dir(release["source"], ws)
    digest = _digest(release, model_name, cfg)
    address = connect(cluster_address(cfg, ws))
    from ray import serve

    record = read_app(ws)
    running = _app_status(cfg.ray.app_name)
    if record is not None and record.get("digest") == digest and running == "RUNNING":
        return RayApp(**{**record["app"], "action": "unchanged"})
    serve.start(http_options={"host": cfg.server.host, "port": cfg.ray.http_port})
    application = serve_deployment(cfg).bind(release, model_name, cfg.model_dump(mode="json"), ws.location,
                                        _tracking_uri(ws, release), keys)
    serve.run_many([serve.RunTarget(application, name=cfg.ray.app_name, route_prefix="/")],
                   wait_for_applications_running=False)
    _wait_running(cfg)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(cfg.server.host, cfg.server.host)
    endpoint = f"http://[{host}]:{cfg.ray.http_port}" if ":" in host else f"http://{host}:{cfg.ray.http_port}"
    app = RayApp(endpoint, model_name, release["model_ref"], release["version"],
                 "rolled" if running is not None else "deployed", cfg.ray.app_name, address, release)
    atomic_write_json(ws.serve_app_record, {
        "platform": "ray", "app": app.as_dict(), "model_ref": app.model_ref, "model_name": model_name,
        "endpoint": endpoint, "release": release, "digest": digest, "serving_config": cfg.model_dump(mode="json"),
        "deployed_at": time.time()})
    return app


def stop_app(ws: Workspace) -> bool:
    """Delete the Serve application this workspace deployed; True when one was running and is gone now."""
    record = read_app(ws)
    if record is None:
        return False
    app = record["app"]
    deleted = False
    if _reachable(app["address"]):  # a stopped cluster (`lmforge stack down`) took the application with it
        connect(app["address"])
        from ray import serve

        if _app_status(app["app_name"]) is not None:
            serve.delete(app["app_name"])
            deleted = True
    (ws.serve_app_record).unlink(missing_ok=True)
    return deleted


def read_app(ws: Workspace) -> dict[str, Any] | None:
    """The recorded application or None: ``model_ref``, ``model_name``, ``endpoint``, ``release`` (as the local
    deployment's record has them), ``app`` (:class:`RayApp`'s fields), ``serving_config`` and ``digest``."""
    path = ws.serve_app_record
    return json.loads(path.read_text()) if path.exists() else None


def cluster_address(cfg: ServingConfig, ws: Workspace) -> str | None:
    """``serving.ray.address``, else ``RAY_ADDRESS``, else this workspace's stack Ray head; None when this
    process already joined a Ray."""
    import ray

    if ray.is_initialized():
        return None
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return cfg.ray.address or os.environ["RAY_ADDRESS"]
    from lmforge.stack.control import role_state

    head = role_state(ws, "ray-head")
    if head.state == "running" and head.url:
        # The stack's head wants its clients in its authentication mode (token by default).
        os.environ.setdefault("RAY_AUTH_MODE", head.extra.get("auth_mode", "token"))
        return head.url
    raise ServingError(
        "serving.platform is 'ray' but no Ray cluster is known to keep the Serve application running",
        "start the stack's Ray head (`lmforge stack up`), or point serving.ray.address (or RAY_ADDRESS) at a "
        "running Ray cluster; serving.platform: local runs the server as a process instead",
    )


def connect(address: str | None) -> str:
    """Join the Ray cluster at ``address`` unless this process already has; returns the cluster's GCS address."""
    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError) as exc:
            raise ServingError(f"cannot join the Ray cluster at {address}: {exc}",
                               "check that it runs (`lmforge stack status`, `ray status --address ...`) and that "
                               "RAY_AUTH_MODE matches its authentication") from exc
    return str(ray.get_runtime_context().gcs_address)


def _digest(release: dict[str, str], model_name: str, cfg: ServingConfig) -> str:
    """What the application serves, as one value: another version, directory contents or config rolls it."""
    facts = {"release": {k: release.get(k, "") for k in ("registered_name", "version", "source", "fingerprint")},
             "name": model_name, "cfg": cfg.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def _tracking_uri(ws: Workspace, release: dict[str, str]) -> str | None:
    if not release.get("registered_name"):
        return None
    from lmforge.tracking.mlflow_tracker import mlflow_uris

    return mlflow_uris(ws)[0]


def serve_deployment(cfg: ServingConfig) -> Any:
    """The Serve deployment of :data:`~lmforge.serving.ray_serve.replica.ModelServer` as ``cfg.ray`` sizes it."""
    from ray import serve

    from lmforge.serving.ray_serve.replica import ModelServer

    ray_cfg = cfg.ray
    options: dict[str, Any] = {
        "name": DEPLOYMENT,
        "ray_actor_options": {"num_cpus": ray_cfg.num_cpus, "num_gpus": ray_cfg.num_gpus},
        "max_ongoing_requests": ray_cfg.max_ongoing_requests or cfg.scheduler.max_batch_size,
        "max_surge_percent": ray_cfg.max_surge_percent,
        "health_check_period_s": ray_cfg.health_check_period_s,
        "health_check_timeout_s": ray_cfg.health_check_timeout_s,
        "graceful_shutdown_timeout_s": max(cfg.server.drain_timeout_s, 1.0),
        "graceful_shutdown_wait_loop_s": 0.5,
        # A replica that cannot load its model fails the same way every time: report it, do not retry 20 times.
        "max_constructor_retry_count": 2,
        # One access-log line per request floods the replica logs (and a driver's terminal) under load.
        "logging_config": {"enable_access_log": False, "log_level": "WARNING"},
    }
    if ray_cfg.autoscaling is not None:
        options["autoscaling_config"] = ray_cfg.autoscaling.model_dump()
    else:
        options["num_replicas"] = ray_cfg.num_replicas
    return serve.deployment(ModelServer, **options)


def _app_status(name: str) -> str | None:
    from ray import serve

    app = serve.status().applications.get(name)
    return None if app is None else str(app.status.value if hasattr(app.status, "value") else app.status)


def _wait_running(cfg: ServingConfig) -> None:
    """Until this deploy's version runs on every replica (the roll finished), or a clear error."""
    from ray import serve

    name, timeout_s = cfg.ray.app_name, cfg.server.startup_timeout_s
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(name)
        # Serve marks the application DEPLOYING before run_many returns (serve.run's own wait relies on it), so
        # RUNNING here is this deploy's: every replica runs the new version and the old ones were stopped.
        if app is not None and app.status == "RUNNING":
            return
        if app is not None and app.status == "DEPLOY_FAILED":
            raise ServingError(f"Ray Serve could not start the replicas of {name!r}: {app.message[-2000:]}",
                               "fix what the message shows (model, serving config, resources per replica: "
                               "serving.ray.num_cpus / num_gpus); replica logs are in the Ray session's logs/serve")
        time.sleep(0.2)
    raise ServingError(
        f"the Serve application {name!r} was not running within {timeout_s:.0f} s (replicas still loading, or "
        "waiting for CPUs/GPUs the cluster does not have)",
        "raise serving.server.startup_timeout_s for a large model, or lower serving.ray.num_replicas / num_cpus / "
        "num_gpus to what the cluster offers (`ray status`)",
    )


def _reachable(address: str) -> bool:
    """Whether the cluster's GCS at ``host:port`` accepts connections (a ray:// address is assumed to)."""
    import ray

    if ray.is_initialized() or "://" in address:
        return True
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False
