"""``lmforge ui``: the Prefect UI with the pipeline deployed on a schedule, and the MLflow UI.

Starts a local Prefect server (SQLite in the workspace) and an MLflow server on loopback as child
processes, then serves the pipeline flow as the deployment ``lmforge-pipeline/lmforge`` with the
retraining cron from ``platform.schedule_cron``. A scheduled run continues from the current champion
(``models:/NAME@champion``) when one exists and the config names no ``model.base_model`` (the flow's
``continue_from`` parameter, ``auto``; see :func:`lmforge.stages.base_model.choose_base`). From the
Prefect UI a user starts a run with edited parameters (the pipeline config and ``continue_from`` are the
form); the run's MLflow experiment shows up in the MLflow UI. Ctrl-C stops all three. With
``PREFECT_API_URL`` already set, the existing Prefect server is used instead of starting one.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from lmforge.config import PipelineConfig
from lmforge.core.errors import ServingError
from lmforge.core.workspace import Workspace, atomic_write_json

DEPLOYMENT_NAME = "lmforge"


def run_ui(config: PipelineConfig, ws: Workspace, prefect_port: int = 4200, mlflow_port: int = 5000,
           config_path: str | None = None) -> None:
    children: list[subprocess.Popen] = []
    # SIGTERM (a service manager, `kill`) stops the UI as Ctrl-C does, so the servers below stop too.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        prefect_api = os.environ.get("PREFECT_API_URL")
        if not prefect_api:
            prefect_api = f"http://127.0.0.1:{prefect_port}/api"
            children.append(_start_prefect(ws, prefect_port))
        mlflow_url = f"http://127.0.0.1:{mlflow_port}"
        children.append(_start_mlflow(ws, config, mlflow_port))
        _wait_http(f"{prefect_api}/health", children, "Prefect server", ws)
        _wait_http(f"{mlflow_url}/health", children, "MLflow server", ws)
        os.environ["PREFECT_API_URL"] = prefect_api
        os.environ.setdefault("MLFLOW_TRACKING_URI", _tracking_uri(ws, config))
        atomic_write_json(ws.ui_file, {"prefect_url": prefect_api.removesuffix("/api"),
                                       "mlflow_url": mlflow_url, "pid": os.getpid()})
        print(f"Prefect UI: {prefect_api.removesuffix('/api')}", flush=True)
        print(f"MLflow UI:  {mlflow_url}", flush=True)
        print(f"Deployment: lmforge-pipeline/{DEPLOYMENT_NAME} (cron '{config.platform.schedule_cron}')"
              f" from {config_path or 'the built-in defaults'}; Ctrl-C stops", flush=True)
        print("Scheduled runs continue from the champion when one exists (continue_from: auto)", flush=True)

        # Imported only now so Prefect reads the API URL we just set.
        from flows.pipeline import pipeline

        pipeline.serve(name=DEPLOYMENT_NAME, cron=config.platform.schedule_cron,
                       parameters={"config": config.model_dump(mode="json"), "continue_from": "auto"},
                       tags=["lmforge"], print_starting_message=False)
    finally:
        _stop(children)


def _die_with_parent() -> None:
    """In the child, before exec (Linux): SIGTERM when `lmforge ui` dies, even killed with SIGKILL,
    so a server in its own session never outlives the UI that started it."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop(children: list[subprocess.Popen]) -> None:
    """Stop each server with its whole process group: each runs in its own session, and the servers
    fork workers that outlive a parent stopped alone."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        for child in children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, sig)
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=wait_s)


def _start_prefect(ws: Workspace, port: int) -> subprocess.Popen:
    _require_free(port, "--prefect-port")
    env = dict(os.environ, PREFECT_HOME=str(ws.prefect_dir), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api")
    env.pop("PREFECT_API_URL", None)
    log = _log_file(ws, "prefect-server.log")
    cmd = [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_die_with_parent)


def _start_mlflow(ws: Workspace, config: PipelineConfig, port: int) -> subprocess.Popen:
    _require_free(port, "--mlflow-port")
    ws.mlflow_dir.mkdir(parents=True, exist_ok=True)
    log = _log_file(ws, "mlflow-server.log")
    cmd = [_bin("mlflow"), "server", "--backend-store-uri", _tracking_uri(ws, config), *artifact_flags(ws, config),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_die_with_parent)


def artifact_flags(ws: Workspace, config: PipelineConfig) -> list[str]:
    """Artifacts on a store (platform.mlflow_artifacts, or an object-store workspace) are served by
    the server (``mlflow-artifacts:/`` URIs), so a client on another machine needs only the server's
    URL, not the store's credentials; the server reads them from its environment's standard chain.
    A local workspace keeps its artifact directory, which clients read directly."""
    from lmforge.tracking.mlflow_tracker import artifacts_destination

    destination = artifacts_destination(ws, config.platform)
    if destination == ws.mlflow_artifacts_uri:
        return ["--default-artifact-root", destination, "--no-serve-artifacts"]
    return ["--artifacts-destination", destination, "--serve-artifacts"]


def _tracking_uri(ws: Workspace, config: PipelineConfig) -> str:
    from lmforge.tracking.mlflow_tracker import mlflow_uris

    return mlflow_uris(ws, config.platform)[0]


def _bin(name: str) -> str:
    """The console script installed beside this interpreter (the project's venv)."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def _log_file(ws: Workspace, name: str):
    path = ws.logs_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "ab")


def _require_free(port: int, flag: str) -> None:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise ServingError(f"port {port} on 127.0.0.1 is already in use",
                               f"stop whatever listens there or pass another {flag}") from None


def _wait_http(url: str, children: list[subprocess.Popen], what: str, ws: Workspace,
               timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in children:
            if child.poll() is not None:
                raise ServingError(f"{what} exited with code {child.returncode} while starting",
                                   f"read the logs in {ws.logs_dir}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise ServingError(f"{what} did not answer at {url} within {timeout:.0f}s",
                       f"read the logs in {ws.logs_dir}")
