"""``lmforge ui``: the Prefect UI with the pipeline deployed on a schedule, and the MLflow UI.

Starts a local Prefect server (SQLite in the workspace) and an MLflow server on loopback through
:mod:`lmforge.stack` (the roles of ``lmforge stack up``, tied to this process; a stack already up is used
and left running), then serves the pipeline flow as the deployment ``lmforge-pipeline/lmforge`` with the
retraining cron from ``platform.schedule_cron``. A scheduled run continues from the current champion
(``models:/NAME@champion``) when one exists and the config names no ``model.base_model`` (the flow's
``continue_from`` parameter, ``auto``; see :func:`lmforge.stages.base_model.choose_base`). From the
Prefect UI a user starts a run with edited parameters (the pipeline config and ``continue_from`` are the
form); the run's MLflow experiment shows up in the MLflow UI. Ctrl-C stops all three. With
``PREFECT_API_URL`` already set, the existing Prefect server is used instead of starting one.
"""

from __future__ import annotations

import os
import signal

from lmforge.config import PipelineConfig
from lmforge.core.workspace import Workspace, atomic_write_json
from lmforge.stack import control
from lmforge.stack.roles import Options, artifact_flags

# Where tests and callers found it before the stack owned it.
__all__ = ["DEPLOYMENT_NAME", "artifact_flags", "run_ui"]

DEPLOYMENT_NAME = "lmforge"


def run_ui(config: PipelineConfig, ws: Workspace, prefect_port: int = 4200, mlflow_port: int = 5000,
           config_path: str | None = None) -> None:
    # SIGTERM (a service manager, `kill`) stops the UI as Ctrl-C does, so the servers below stop too.
    signal.signal(signal.SIGTERM, _interrupt)
    configured_api = os.environ.get("PREFECT_API_URL")
    # The stack's roles, tied to this process (they die with it, even killed); a stack already up (`lmforge
    # stack up`) is used as it is and left running.
    options = Options(prefect_port=prefect_port, mlflow_port=mlflow_port, timeout=120, tied=True,
                      roles=("mlflow",) if configured_api else ("prefect-server", "mlflow"))
    states, started = control.up(ws, config, options)
    try:
        prefect_api = configured_api or str(states["prefect-server"].url)
        mlflow_url = str(states["mlflow"].url)
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
        control.down(ws, only=tuple(started))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _tracking_uri(ws: Workspace, config: PipelineConfig) -> str:
    from lmforge.tracking.mlflow_tracker import mlflow_uris

    return mlflow_uris(ws, config.platform)[0]
