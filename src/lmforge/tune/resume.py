"""Continuing a stopped search: which search, with which config, and its parent MLflow run.

A search writes ``tune/<tune_id>/search.json`` (its id, its whole config and when it started) before
Ray starts, and ``result.json`` when it ends; a search with the first and not the second was stopped
(the driver killed, the machine lost). ``lmforge tune CONFIG --resume [TUNE_ID]`` picks it up: Ray
Tune restores its experiment (finished trials stay finished, ASHA's and the searcher's state come
back, unfinished and errored trials start again and continue from their own in-line checkpoints), and
the same parent run gets the rest of the trials. The config must be the one the search started with:
another space or another training section would mix two searches in one parent run.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from lmforge.config.platform import PlatformConfig
from lmforge.core.errors import ConfigError
from lmforge.core.storage import open_store
from lmforge.core.workspace import Workspace
from lmforge.tracking.mlflow_tracker import MlflowTracker, mlflow_client
from lmforge.tune.runs import PARENT_TAG, TUNE_TAG

SEARCH = "search.json"  # tune/<tune_id>/search.json: {tune_id, started_at, config}
RESULT = "result.json"  # tune/<tune_id>/result.json: the search's summary, once it ended
LATEST = "latest"  # --resume without an id: the newest search that did not end
# The sections a trial's config is built from: resuming with others would change the search under way.
SEARCHED_SECTIONS = ("tune", "training", "model")


def record_start(ws: Workspace, out_dir: Path, tune_id: str, raw: dict[str, Any]) -> None:
    """Write ``search.json`` before any trial runs, so a search stopped at any point can be resumed."""
    open_store(ws).atomic_write_json(out_dir / SEARCH, {"tune_id": tune_id, "config": raw,
                                                        "started_at": datetime.now(UTC).isoformat()})


def resumable(ws: Workspace, tune_dir: Path, wanted: str, raw: dict[str, Any]) -> str:
    """The id of the stopped search ``wanted`` names (``latest``: the newest), checked against ``raw``."""
    store = open_store(ws)
    if wanted == LATEST:
        stopped = [record for record in _searches(ws, tune_dir) if not store.exists(tune_dir / record["tune_id"] / RESULT)]
        if not stopped:
            raise ConfigError(f"--resume: no stopped search in {ws.shown(tune_dir)} (each one there ended, or none ran)",
                              "start a search with `lmforge tune CONFIG`, or name one with --resume TUNE_ID")
        record = max(stopped, key=lambda r: r["started_at"])
    else:
        if "/" in wanted or wanted.startswith("."):
            raise ConfigError(f"--resume {wanted!r} is not a search id", "pass an id such as tune-20261206-101500-ab12cd "
                              f"(the directories of {ws.shown(tune_dir)})")
        if not store.exists(tune_dir / wanted / SEARCH):
            raise ConfigError(f"--resume {wanted}: {ws.shown(tune_dir / wanted / SEARCH)} does not exist",
                              "pass the id of a search this workspace ran (its directory under tune/), or --resume "
                              "without an id for the newest stopped one")
        if store.exists(tune_dir / wanted / RESULT):
            raise ConfigError(f"--resume {wanted}: that search ended (its result is {ws.shown(tune_dir / wanted / RESULT)})",
                              "start a new search with `lmforge tune CONFIG` (without --resume)")
        record = store.read_json(tune_dir / wanted / SEARCH)
    changed = [name for name in SEARCHED_SECTIONS if record["config"].get(name) != raw.get(name)]
    if changed:
        raise ConfigError(f"--resume {record['tune_id']}: the config's {', '.join(changed)} section(s) differ from "
                          "what the search started with",
                          f"pass the config it started with (kept in {ws.shown(tune_dir / record['tune_id'] / SEARCH)}), "
                          "or start a new search without --resume")
    return str(record["tune_id"])


def reopen_parent(ws: Workspace, platform: PlatformConfig | None, tune_id: str) -> MlflowTracker:
    """The stopped search's parent run, marked running again."""
    client = mlflow_client(ws, platform)
    runs = client.search_runs(_all_experiments(client), f"tags.`{TUNE_TAG}` = '{tune_id}'")
    parents = [run for run in runs if PARENT_TAG not in run.data.tags]
    if not parents:
        raise ConfigError(f"--resume {tune_id}: MLflow has no parent run tagged {TUNE_TAG}={tune_id}",
                          "point platform.mlflow_tracking_uri at the tracking server the search used, or start a "
                          "new search without --resume")
    client.update_run(parents[0].info.run_id, status="RUNNING")
    return MlflowTracker(client, parents[0].info.run_id)


def _searches(ws: Workspace, tune_dir: Path) -> list[dict[str, Any]]:
    store = open_store(ws)
    keys = [key for key in store.list_files(tune_dir, recursive=True) if PurePosixPath(key).name == SEARCH]
    return [store.read_json(tune_dir / PurePosixPath(key).parent.name / SEARCH) for key in keys]


def _all_experiments(client: Any) -> list[str]:
    return [experiment.experiment_id for experiment in client.search_experiments()]
