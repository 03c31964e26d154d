"""MLflow behind the :class:`lmforge.tracking.tracker.Tracker` interface, where MLflow lives, what it holds.

Every client is built with explicit tracking and registry URIs (never ``mlflow.set_tracking_uri``)
so two workspaces in one process never write into each other's database. MLflow is imported inside
functions: the engine imports without it.

Where MLflow lives, first match wins: env ``MLFLOW_TRACKING_URI``, ``platform.mlflow_tracking_uri``,
else SQLite at ``<LMFORGE_HOME>/mlflow/mlflow.db`` with artifacts under ``<LMFORGE_HOME>/mlflow``.
Artifacts go where :func:`artifacts_destination` says: ``platform.mlflow_artifacts``, else
``<workspace URL>/mlflow-artifacts`` for an object-store workspace (so a registered model is in the
bucket, reachable from any machine), else the workspace's own directory. On an object-store
workspace the SQLite file itself is this machine's (under the cache): one machine is fine; a team
points ``platform.mlflow_tracking_uri`` at a shared MLflow server.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from lmforge.config.platform import PlatformConfig
from lmforge.core.errors import RegistryError
from lmforge.core.workspace import Workspace

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import RegisteredModel

# MLflow's own limits on one log_batch request and on a param value.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_PARAM_VALUE_CHARS = 6000


def mlflow_uris(ws: Workspace, platform: PlatformConfig | None = None) -> tuple[str, str]:
    """(tracking_uri, registry_uri); the registry follows tracking unless MLFLOW_REGISTRY_URI is set."""
    platform = platform or PlatformConfig()
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or platform.mlflow_tracking_uri or ws.mlflow_tracking_uri
    registry = os.environ.get("MLFLOW_REGISTRY_URI") or tracking
    return tracking, registry


def artifacts_destination(ws: Workspace, platform: PlatformConfig | None = None) -> str:
    """Where MLflow artifacts live: ``platform.mlflow_artifacts``, else beside an object-store
    workspace (``<LMFORGE_HOME>/mlflow-artifacts``: what MLflow stores must be reachable from other
    machines), else the local workspace's ``mlflow/artifacts`` directory (a file: URI)."""
    platform = platform or PlatformConfig()
    if platform.mlflow_artifacts:
        return platform.mlflow_artifacts
    if ws.url is not None:
        return f"{ws.url}/mlflow-artifacts"
    return ws.mlflow_artifacts_uri


def is_local_store(uri: str) -> bool:
    """True for stores this process writes directly (SQLite, files), false for a tracking server."""
    return urlparse(uri).scheme in ("", "file", "sqlite")


def mlflow_client(ws: Workspace, platform: PlatformConfig | None = None) -> MlflowClient:
    """An ``MlflowClient`` bound to this workspace's tracking and registry URIs."""
    from mlflow import MlflowClient

    tracking, registry = mlflow_uris(ws, platform)
    for uri in {tracking, registry}:
        if uri.startswith("sqlite:///"):
            # SQLite creates the database file but not its directory.
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking, registry_uri=registry)


def ensure_experiment(client: MlflowClient, name: str, ws: Workspace, platform: PlatformConfig | None = None) -> str:
    """The id of experiment ``name``, created on first use.

    For a local store the artifact root is :func:`artifacts_destination` (the workspace, or the
    object store); left to MLflow it would be ``./mlruns`` relative to whatever directory the process
    started in. A tracking server keeps its own artifact root (``--artifacts-destination``), so
    clients on other machines reach the files through it. An experiment keeps the root it was
    created with.
    """
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = artifacts_destination(ws, platform) if is_local_store(client.tracking_uri) else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)  # another process created it first
            if experiment is None:  # and deleted it for good since: nothing to return
                raise
    if experiment.lifecycle_stage == "deleted":
        raise RegistryError(
            f"MLflow experiment {name!r} is deleted",
            f"restore it with `mlflow experiments restore --experiment-id {experiment.experiment_id}` "
            "or set registry.experiment to another name",
        )
    return experiment.experiment_id


def flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dicts as dotted keys with string values, each within MLflow's length limit."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        # MLflow rejects longer values; the full config travels as tags/artifacts anyway.
        flat[name] = text if len(text) <= MAX_PARAM_VALUE_CHARS else text[: MAX_PARAM_VALUE_CHARS - 3] + "..."
    return flat


def history_metrics(history: list[dict[str, Any]], timestamp_ms: int | None = None) -> list[Any]:
    """MLflow ``Metric`` entities for every numeric value of every history row, at its ``step``."""
    from mlflow.entities import Metric

    now = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
    entities = []
    for index, row in enumerate(history):
        step = int(row.get("step", index))
        for key, value in row.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            entities.append(Metric(key, float(value), now, step))
    return entities


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


MAX_DATASET_DIGEST = 36


class MlflowTracker:
    """A :class:`~lmforge.tracking.tracker.Tracker` writing into one MLflow run through batched calls."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    @classmethod
    def start(
        cls,
        ws: Workspace,
        platform: PlatformConfig | None,
        experiment: str,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> MlflowTracker:
        """Open a new run in ``experiment``; call :meth:`finish` when done."""
        client = mlflow_client(ws, platform)
        experiment_id = ensure_experiment(client, experiment, ws, platform)
        run = client.create_run(experiment_id, run_name=run_name, tags=tags or {})
        return cls(client, run.info.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        entities = [Param(k, v) for k, v in flatten_params(params).items()]
        for chunk in _chunks(entities, MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=chunk)

    def log_metrics(
        self, metrics: dict[str, float], step: int | None = None, *, model_id: str | None = None
    ) -> None:
        """One batched call; ``model_id`` links the values to a LoggedModel's page as well."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entities = [
            Metric(k, float(v), now, step or 0, model_id=model_id)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        for chunk in _chunks(entities, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_history(self, history: list[dict[str, Any]]) -> None:
        for chunk in _chunks(history_metrics(history), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        entities = [RunTag(k, str(v)) for k, v in tags.items()]
        for chunk in _chunks(entities, MAX_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=chunk)

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_datasets(self, datasets: list[dict[str, Any]], context: str = "training") -> None:
        """Record dataset inputs ({name, digest, path, rows}) with their digests on the run."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        inputs = []
        for item in datasets:
            digest = str(item["digest"])
            entity = Dataset(
                name=str(item["name"]),
                # MLflow caps dataset digests at 36 characters; the full digest stays in `source`
                # and in the lmforge.data.* tags.
                digest=digest[:MAX_DATASET_DIGEST],
                source_type="local",
                source=json.dumps({"uri": str(item.get("path", "")), "digest": digest}),
                profile=json.dumps({"num_rows": item.get("rows")}),
            )
            tag = InputTag(MLFLOW_DATASET_CONTEXT, str(item.get("context", context)))
            inputs.append(DatasetInput(entity, tags=[tag]))
        if inputs:
            self.client.log_inputs(self.run_id, datasets=inputs)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


# ---------------------------------------------------------------- what the registry holds


def run_metric(client: MlflowClient, run_id: str | None, metric: str) -> float | None:
    """The latest value of ``metric`` in a run (the final, highest-step one), or None."""
    if not run_id:
        return None
    value = client.get_run(run_id).data.metrics.get(metric)
    return None if value is None else float(value)


def list_models(
    ws: Workspace, platform: PlatformConfig | None = None, metric: str = "eval_perplexity"
) -> list[dict[str, Any]]:
    """Every registered model: its aliases, latest version and each version's ``metric``."""
    client = mlflow_client(ws, platform)
    models: list[dict[str, Any]] = []
    for registered in _all_registered_models(client):
        aliases = {alias: str(v) for alias, v in (registered.aliases or {}).items()}
        rows = []
        for mv in sorted(client.search_model_versions(f"name='{registered.name}'"), key=lambda v: int(v.version)):
            rows.append(
                {
                    "version": str(mv.version),
                    "run_id": mv.run_id,
                    "aliases": sorted(a for a, v in aliases.items() if v == str(mv.version)),
                    "value": run_metric(client, mv.run_id, metric),
                    "created_ms": mv.creation_timestamp,
                }
            )
        models.append(
            {
                "name": registered.name,
                "aliases": aliases,
                "latest_version": rows[-1]["version"] if rows else None,
                "metric": metric,
                "versions": rows,
            }
        )
    return models


def _all_registered_models(client: MlflowClient) -> list[RegisteredModel]:
    found: list[RegisteredModel] = []
    token: str | None = None
    while True:
        page = client.search_registered_models(max_results=100, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return sorted(found, key=lambda m: m.name)


def describe_registry(ws: Workspace, platform: PlatformConfig | None, name: str | None) -> str:
    """What the registry holds, for error messages: all names, or one model's versions and aliases."""
    tracking = mlflow_uris(ws, platform)[0]
    client = mlflow_client(ws, platform)
    if name is None:
        names = [m.name for m in _all_registered_models(client)]
        return f"registry {tracking} holds: {', '.join(names) if names else 'no models'}"
    from mlflow.exceptions import MlflowException

    try:
        aliases = client.get_registered_model(name).aliases or {}
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return f"no registered model {name!r}; " + describe_registry(ws, platform, None)
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    return f"versions: {versions or 'none'}; aliases: {dict(aliases) or 'none'}"
