"""Process environment for one workspace: where Prefect, Ray and MLflow keep their state.

Called once at the start of every CLI command, before Prefect is imported, so that a run's
orchestration state lands in its own ``LMFORGE_HOME`` and two homes never interfere. Variables
the user already set (a real Prefect server, an MLflow server, a Ray cluster) are left alone:
switching to a cluster is configuration, not code.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from lmforge import __version__
from lmforge.core.workspace import Workspace


def torchrun_world() -> int | None:
    """How many ranks torchrun started this process among (None: torchrun did not start it). One rank is a
    group too: ``--nproc-per-node 1`` runs any strategy on one device, as Ray with one worker does."""
    return int(os.environ.get("WORLD_SIZE", "1")) if "TORCHELASTIC_RUN_ID" in os.environ else None


def cpu_count() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and Ray narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def prepare_environment(ws: Workspace) -> None:
    ws.ensure()
    defaults = {
        "PREFECT_HOME": str(ws.prefect_dir),
        # The temporary server's telemetry writer races the first flow run on SQLite.
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_DEDUP_LOGS": "1",
        "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    # The URL of a remote workspace, not its local side: processes started from here (Prefect tasks,
    # Ray workers) must open the same store.
    os.environ["LMFORGE_HOME"] = ws.location


def code_version() -> str:
    """The git commit of the checkout when there is one, else the package version."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip() or __version__
    except (OSError, subprocess.SubprocessError):
        return __version__
