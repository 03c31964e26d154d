"""The register and promote stages, and resolving ``models:/`` URIs for serving.

``register`` records one MLflow run (params, per-step history, final metrics, dataset digests,
lineage tags), stores the model directory as an MLflow 3 LoggedModel and registers it as a new
version; ``promote`` moves the alias (``champion``) only by the promotion rule; ``resolve_model``
downloads ``models:/NAME@ALIAS`` into the workspace for the server. The CLI commands are
``lmforge promote`` and ``lmforge models``; ``lmforge run`` registers.

The model is stored as plain files (config, safetensors, tokenizer), never a pickle, so
``mlflow.artifacts.download_artifacts("models:/NAME@champion")`` gives back a directory that
``from_pretrained`` loads without running any code from the registry.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmforge.config.stages import PlatformConfig, RegistryConfig
from lmforge.errors import DataError, RegistryError
from lmforge.metrics import relative_improvement
from lmforge.mlflow_tracker import (  # noqa: F401 - mlflow_uris and list_models are re-exported
    MlflowTracker,
    describe_registry,
    list_models,
    mlflow_client,
    mlflow_uris,
    run_metric,
)
from lmforge.workspace import Workspace, atomic_dir

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))/?$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SOURCE_MARKER = ".lmforge-source.json"


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    model_uri: str  # models:/NAME/VERSION
    source: str  # where the files live (the LoggedModel's artifact location)
    model_id: str
    metrics: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    reason: str
    alias: str
    name: str
    metric: str
    candidate_version: str
    champion_version: str | None  # holder of the alias after the decision
    previous_champion_version: str | None
    candidate_value: float | None
    champion_value: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_model_dir(model_dir: Path) -> None:
    """A servable model directory: config, safetensors weights, a tokenizer, and no pickles."""
    if not (model_dir / "config.json").is_file():
        raise DataError(f"{model_dir} has no config.json", "train a model with `lmforge train` or `lmforge run`")
    names = [p.name for p in model_dir.iterdir()]
    if not any(n.endswith(".safetensors") for n in names):
        raise DataError(f"{model_dir} has no .safetensors weights", "save the model with save_pretrained()")
    if not any(n in ("tokenizer.json", "tokenizer_config.json") for n in names):
        raise DataError(f"{model_dir} has no tokenizer files", "save the tokenizer next to the model")
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise DataError(
            f"{model_dir} holds pickled files {pickles}; the registry stores safetensors only",
            "remove them (weights belong in model.safetensors)",
        )


def register(
    cfg: RegistryConfig,
    platform: PlatformConfig | None,
    ws: Workspace,
    *,
    model_dir: Path,
    params: dict[str, Any],
    metrics: dict[str, float],
    history: list[dict[str, Any]],
    dataset_inputs: list[dict[str, Any]],
    tags: dict[str, str],
    reports: list[Path] = (),
) -> RegisteredVersion:
    """One MLflow run with everything that produced ``model_dir``, and a new registered version.

    The files are stored as an MLflow 3 LoggedModel (source run = this run) and the version points
    at its artifact location. All or nothing: if anything fails after the run starts, the run and
    any half-made LoggedModel are marked FAILED and no model version remains (one created just
    before the failure is deleted again). The error text is kept as the run's ``lmforge.error`` tag.
    """
    from mlflow.entities import LoggedModelOutput

    model_dir = Path(model_dir)
    lineage = {str(k): str(v) for k, v in tags.items()}
    tracker = MlflowTracker.start(
        ws, platform, cfg.experiment, run_name=f"{cfg.model_name}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={**lineage, "lmforge.model_dir": str(model_dir.resolve())},
    )
    client, run_id = tracker.client, tracker.run_id
    final_step = max((int(row.get("step", 0)) for row in history), default=0)
    model_id, version = None, None
    try:
        check_model_dir(model_dir)
        tracker.log_params(params)
        tracker.log_history(history)
        tracker.log_datasets(dataset_inputs)
        for report in reports:  # the data gate's verdicts and the curation counts, beside the model
            client.log_artifact(run_id, str(report), "data_reports")
        experiment_id = client.get_run(run_id).info.experiment_id
        logged = client.create_logged_model(
            experiment_id, name=cfg.model_name, source_run_id=run_id, tags=lineage, model_type="causal-lm"
        )
        model_id = logged.model_id
        client.log_model_artifacts(model_id, str(model_dir))
        client.finalize_logged_model(model_id, "READY")
        client.log_outputs(run_id, [LoggedModelOutput(model_id, final_step)])
        tracker.log_metrics(metrics, step=final_step, model_id=model_id)
        version = _create_version(client, cfg.model_name, logged.artifact_location, run_id, model_id, lineage)
        tracker.finish("FINISHED")
    except BaseException as exc:
        _undo(tracker, cfg.model_name, model_id, version, exc)
        raise
    result = RegisteredVersion(
        name=cfg.model_name,
        version=str(version.version),
        run_id=run_id,
        model_uri=f"models:/{cfg.model_name}/{version.version}",
        source=client.get_model_version_download_uri(cfg.model_name, version.version),
        model_id=model_id,
        metrics={k: float(v) for k, v in metrics.items()},
    )
    ws.write_state("register", result.as_dict())
    return result


def _create_version(client: Any, name: str, source: str, run_id: str, model_id: str, tags: dict[str, str]):
    """A new version of ``name`` whose files are the LoggedModel's, linked both ways.

    ``source`` is the LoggedModel's artifact location rather than ``models:/<model_id>``: MLflow's
    SQL registry resolves the latter through the process-global tracking URI, which may be another
    workspace's database.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags, model_id=model_id)
    # The link the MLflow UI follows from a LoggedModel to its registered versions.
    link = [{"name": name, "version": str(version.version)}]
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(link)})
    return version


def _undo(tracker: MlflowTracker, name: str, model_id: str | None, version: Any, error: BaseException) -> None:
    """Remove a just-created version and leave FAILED markers; a second failure is attached to the
    first as a note rather than hiding it."""
    try:
        if version is not None:
            tracker.client.delete_model_version(name, version.version)
        if model_id is not None:
            tracker.client.finalize_logged_model(model_id, "FAILED")
        tracker.set_tags({"lmforge.error": f"{type(error).__name__}: {error}"[:5000]})
        tracker.finish("FAILED")
    except Exception as cleanup:  # noqa: BLE001 - reported on the original exception below
        error.add_note(f"cleaning up MLflow run {tracker.run_id} after the failure also failed: {cleanup!r}")


def promote(cfg: RegistryConfig, platform: PlatformConfig | None, ws: Workspace, version: str) -> PromotionDecision:
    """Move ``cfg.alias`` to ``version`` if it is the first or beats the champion by the margin."""
    client = mlflow_client(ws, platform)
    name, version = cfg.model_name, str(version)
    candidate = _get_version(client, name, version, ws, platform)
    candidate_value = run_metric(client, candidate.run_id, cfg.metric)
    if candidate_value is None:
        raise RegistryError(
            f"version {version} of {name!r} has no metric {cfg.metric!r}",
            "evaluate before registering (`lmforge run` does both) or set registry.metric to a logged metric",
        )
    champion = _version_by_alias(client, name, cfg.alias)
    previous = str(champion.version) if champion is not None else None
    champion_value = run_metric(client, champion.run_id, cfg.metric) if champion is not None else None
    promoted, reason = _decide(cfg, version, candidate_value, previous, champion_value)
    if promoted:
        client.set_registered_model_alias(name, cfg.alias, version)
    decision = PromotionDecision(
        promoted=promoted,
        reason=reason,
        alias=cfg.alias,
        name=name,
        metric=cfg.metric,
        candidate_version=version,
        champion_version=version if promoted else previous,
        previous_champion_version=previous,
        candidate_value=candidate_value,
        champion_value=champion_value,
    )
    decision_tags = {
        "lmforge.promotion.promoted": str(promoted).lower(),
        "lmforge.promotion.reason": reason,
        "lmforge.promotion.compared_to": previous or "",
        "lmforge.promotion.decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for key, value in decision_tags.items():
        client.set_model_version_tag(name, version, key, value)
    ws.write_state("promote", decision.as_dict())
    return decision


def _decide(
    cfg: RegistryConfig, version: str, candidate: float, champion_version: str | None, champion: float | None
) -> tuple[bool, str]:
    """The promotion rule, with a reason that states the numbers either way."""
    label = f"candidate v{version} {cfg.metric}={candidate:.6g}"
    if math.isnan(candidate):
        return False, f"{label} is NaN; kept {_holder(champion_version)}"
    if champion_version is None:
        return True, f"first version: {label}; no {cfg.alias} yet"
    if champion_version == version:
        return False, f"v{version} already holds {cfg.alias} ({cfg.metric}={candidate:.6g})"
    if champion is None or math.isnan(champion):
        return True, f"{label}; champion v{champion_version} has no usable {cfg.metric}, so the measured one wins"
    gain = relative_improvement(candidate, champion, cfg.mode)
    direction = "lower" if cfg.mode == "min" else "higher"
    comparison = (
        f"{label} vs champion v{champion_version} {champion:.6g}: {gain:+.2%} "
        f"({direction} is better; needs at least +{cfg.min_improvement:.2%})"
    )
    if gain > 0 and gain >= cfg.min_improvement:
        return True, f"{comparison}; promoted"
    return False, f"{comparison}; kept v{champion_version}"


def _holder(champion_version: str | None) -> str:
    return f"v{champion_version}" if champion_version else "no champion"


def _version_by_alias(client: Any, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _get_version(client: Any, name: str, version: str, ws: Workspace, platform: PlatformConfig | None):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
    raise RegistryError(
        f"model {name!r} has no version {version!r} ({describe_registry(ws, platform, name)})",
        "pick an existing version, or register one with `lmforge run`",
    )


# ---------------------------------------------------------------- serving side: resolve and list


def resolve_model(uri: str, ws: Workspace, platform: PlatformConfig | None = None) -> tuple[Path, str, str]:
    """(local directory, model name, version) for ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``
    or a local model directory (version ``"local"``).

    Registry versions are downloaded once into ``ws.serving_dir/models/NAME-vVERSION`` (atomically)
    and reused while the registry still points that version at the same files.
    """
    match = _MODELS_URI.match(uri)
    if match is None:
        local = Path(uri).expanduser()
        if local.is_dir():
            return local.resolve(), local.resolve().name, "local"
        raise RegistryError(
            f"{uri!r} is neither a models:/ URI nor an existing directory",
            "pass models:/NAME@ALIAS (e.g. models:/lmforge-demo@champion), models:/NAME/VERSION, "
            "or a model directory",
        )
    name = match["name"]
    if not _SAFE_NAME.match(name):
        raise RegistryError(f"model name {name!r} in {uri!r} is not a plain name", "use letters, digits, _ . -")
    client = mlflow_client(ws, platform)
    version = _resolve_version(client, ws, platform, name, match["alias"], match["version"])
    download_uri = client.get_model_version_download_uri(name, version)
    target = ws.serving_dir / "models" / f"{name}-v{version}"
    marker = target / SOURCE_MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("download_uri") == download_uri:
        return target, name, version
    _download(download_uri, target, mlflow_uris(ws, platform)[0], name, version)
    return target, name, version


def _resolve_version(
    client: Any, ws: Workspace, platform: PlatformConfig | None, name: str, alias: str | None, version: str | None
) -> str:
    _require_registered(client, ws, platform, name)
    if alias is not None:
        found = _version_by_alias(client, name, alias)
        if found is None:
            raise RegistryError(
                f"model {name!r} has no alias {alias!r} ({describe_registry(ws, platform, name)})",
                f"promote a version with `lmforge promote`, or use models:/{name}/VERSION",
            )
        return str(found.version)
    if version == "latest":
        versions = client.search_model_versions(f"name='{name}'")
        return str(max(int(v.version) for v in versions))
    return str(_get_version(client, name, str(version), ws, platform).version)


def _require_registered(client: Any, ws: Workspace, platform: PlatformConfig | None, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    raise RegistryError(
        f"no registered model {name!r} ({describe_registry(ws, platform, None)})",
        "train and register one with `lmforge run`, or use a name listed by `lmforge models`",
    )


def _download(download_uri: str, target: Path, tracking_uri: str, name: str, version: str) -> None:
    import mlflow.artifacts

    with atomic_dir(target) as tmp:
        # MLflow nests a directory download under the URI's last segment; lift the files out of it.
        staging = tmp / ".download"
        fetched = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=download_uri, dst_path=str(staging), tracking_uri=tracking_uri
            )
        )
        for child in fetched.iterdir():
            child.rename(tmp / child.name)
        shutil.rmtree(staging)
        try:
            check_model_dir(tmp)
        except DataError as exc:
            raise RegistryError(
                f"version {version} of {name!r} at {download_uri} is not a servable model: {exc.cause}",
                "register a model directory saved with save_pretrained (safetensors)",
            ) from exc
        marker = {"download_uri": download_uri, "name": name, "version": version}
        (tmp / SOURCE_MARKER).write_text(json.dumps(marker))
