"""The register stage: one MLflow run with everything that produced a model, and a new registered version.

``register`` records params, per-step history, final metrics, dataset digests and lineage tags,
stores the model directory as an MLflow 3 LoggedModel and registers it as a new version. ``lmforge
run`` registers (through :func:`register_trained`). When the train stage tracked the run live
(``mlflow_run_id`` in its hand-off), all of it goes onto that same run, which the version links to.
On an object-store workspace the model and the data reports are read through the store (cached
copies), and the files MLflow keeps go where ``platform.mlflow_artifacts`` says (by default beside
the workspace, ``<LMFORGE_HOME>/mlflow-artifacts``), so the version is reachable from any machine.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmforge.config import PipelineConfig, config_hash
from lmforge.config.platform import PlatformConfig
from lmforge.config.registry import RegistryConfig
from lmforge.core.errors import RegistryError
from lmforge.core.storage import open_store
from lmforge.core.storage.recorded import recorded_dir, recorded_key
from lmforge.core.storage.view import local_view
from lmforge.core.workspace import Workspace
from lmforge.evaluation.frozen_store import publish_evaluation
from lmforge.stages.base_model import TAG_VERSION as BASE_VERSION_TAG
from lmforge.stages.lineage import data_reports, dataset_inputs, lineage_tags, report_inputs
from lmforge.stages.train import tracked_run
from lmforge.tracking.adapter_base import (
    ADAPTER_ARTIFACT,
    BASE_FILE,
    TAG_ADAPTER,
    TAG_BASE,
    TAG_BASE_DIGEST,
    write_base_record,
)
from lmforge.tracking.live import log_new_params, mark_failed
from lmforge.tracking.mlflow_tracker import MlflowTracker, mlflow_client
from lmforge.tracking.model_uris import check_model_dir
from lmforge.train.artifacts import adapter_kind


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
    reports: Sequence[Path] = (),
    run_id: str | None = None,
    model_location: str | None = None,
    adapter_dir: Path | None = None,
    adapter_base: str | None = None,
) -> RegisteredVersion:
    """One MLflow run with everything that produced ``model_dir``, and a new registered version.

    The files are stored as an MLflow 3 LoggedModel (source run = this run) and the version points
    at its artifact location. All or nothing: if anything fails after the run starts, the run and
    any half-made LoggedModel are marked FAILED and no model version remains (one created just
    before the failure is deleted again). The error text is kept as the run's ``lmforge.error`` tag.
    ``run_id`` names the run that tracked training live: it receives all this instead of a new run
    (its params and history are there already; only new params are added). ``model_location`` is
    where the model lives for the ``lmforge.model_dir`` tag when ``model_dir`` is a local copy of it
    (the URL on an object-store workspace). ``adapter_dir`` is a PEFT run's unmerged adapter (its ``base/`` beside
    it), ``adapter_base`` where that base came from: see :func:`_log_adapter`.
    """
    from mlflow.entities import LoggedModelOutput

    model_dir = Path(model_dir)
    lineage = {str(k): str(v) for k, v in tags.items()}
    run_tags = {**lineage, "lmforge.model_dir": model_location or str(model_dir.resolve())}
    reused = run_id is not None
    if run_id is None:
        tracker = MlflowTracker.start(
            ws, platform, cfg.experiment, run_name=f"{cfg.model_name}-{time.strftime('%Y%m%d-%H%M%S')}", tags=run_tags,
        )
    else:
        tracker = MlflowTracker(mlflow_client(ws, platform), run_id)
    client, run_id = tracker.client, tracker.run_id
    final_step = max((int(row.get("step", 0)) for row in history), default=0)
    model_id, version = None, None
    try:
        if reused:
            tracker.set_tags(run_tags)
        check_model_dir(model_dir)
        adapter_tags = _log_adapter(tracker, adapter_dir, adapter_base)
        tracker.set_tags(adapter_tags)
        lineage |= adapter_tags
        if reused:  # training streamed the history and logged the config already
            log_new_params(tracker, params)
        else:
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


def _log_adapter(tracker: MlflowTracker, adapter_dir: Path | None, base: str | None) -> dict[str, str]:
    """Log a LoRA run's unmerged adapter as the run's ``adapter`` artifact, with the record of the base it was trained
    on (``base/`` beside it), so a server of that base can load it at run time (``models:/NAME@ALIAS`` in
    ``POST /v1/load_lora_adapter``); the tags that say so, for the run and the version.

    Only LoRA (and QLoRA: peft's LORA too) is logged: the run-time pool serves LoRA alone
    (``serving/adapters/lora_slots.py``). IA3 is served merged (the version's files); prefix, prompt and bottleneck
    adapters are served with their base from the version's files, which hold them (``model/adapter/``). Those get
    the ``lmforge.adapter`` tag with their kind and nothing more.
    """
    if adapter_dir is None:
        return {}
    kind = adapter_kind(adapter_dir).lower()
    if kind != "lora":
        return {TAG_ADAPTER: kind}
    base_dir = Path(adapter_dir).parent / "base"
    if not base_dir.is_dir():
        raise RegistryError(f"the LoRA adapter in {adapter_dir} has no base/ beside it (the weights it was trained on)",
                            "register the run directory the train stage wrote (adapter/, base/ and model/ side by side)")
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / BASE_FILE
        digest = write_base_record(base_dir, record, base or str(base_dir))
        tracker.log_artifacts(Path(adapter_dir), ADAPTER_ARTIFACT)
        tracker.client.log_artifact(tracker.run_id, str(record), ADAPTER_ARTIFACT)
    return {TAG_ADAPTER: "lora", TAG_BASE: base or str(base_dir), TAG_BASE_DIGEST: digest}


def _location(ws: Workspace, model_dir: str) -> str:
    """Where a trained model lives, as a user finds it: its URL on an object store, else its path."""
    key = recorded_key(ws, model_dir) if ws.is_remote else None
    return open_store(ws).uri(key) if key is not None else str(Path(model_dir).resolve())


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
    except Exception as cleanup:  # noqa: BLE001 - reported on the original exception below
        error.add_note(f"cleaning up MLflow run {tracker.run_id} after the failure also failed: {cleanup!r}")
    mark_failed(tracker.client, tracker.run_id, "register", error)


def _adapter_base(config: PipelineConfig, ws: Workspace, trained: dict[str, Any]) -> str | None:
    """Where a PEFT run's base came from, as a user names it: ``model.base_model`` (with the registered version an
    alias resolved to), else the run's own ``base/`` (pretrained in the run)."""
    if not trained.get("adapter_dir"):
        return None
    params = trained.get("params", {})
    version = params.get(BASE_VERSION_TAG)
    if config.model.base_model:
        return config.model.base_model + (f" (version {version})" if version else "")
    return _location(ws, str(Path(trained["adapter_dir"]).parent / "base"))


def register_trained(config: PipelineConfig, ws: Workspace, trained: dict[str, Any],
                     evaluated: dict[str, Any], flow_run_id: str | None) -> dict[str, Any]:
    """Register one trained-and-evaluated model in MLflow with its full lineage."""
    metrics = {**trained.get("metrics", {}), **evaluated.get("metrics", {})}
    params = {**trained.get("params", {}), "config_hash": config_hash(config)}
    tags = lineage_tags(config, ws, flow_run_id) | {"lmforge.train_run_id": str(trained.get("run_id", ""))}
    tags |= evaluated.get("tags", {})  # the frozen set's digest and the tokenizer's fingerprint (promotion reads them)
    with local_view(ws, report_inputs(ws)) as view:  # the reports under their own names, on any store
        version = register(
            config.registry, config.platform, ws,
            model_dir=recorded_dir(ws, trained["model_dir"]), params=params, metrics=metrics,
            history=trained.get("history", []), dataset_inputs=dataset_inputs(ws), tags=tags,
            reports=data_reports(view), run_id=tracked_run(trained, config.platform, ws),
            model_location=_location(ws, trained["model_dir"]),
            adapter_dir=recorded_dir(ws, trained["adapter_dir"]) if trained.get("adapter_dir") else None,
            adapter_base=_adapter_base(config, ws, trained),
        )
    publish_evaluation(ws, config.platform, config.registry.model_name, version.run_id, evaluated)
    result = version.as_dict() | {"train_run_id": str(trained.get("run_id", ""))}
    ws.write_state("register", result)
    return result
