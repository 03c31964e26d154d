"""The train stage: pretraining then fine-tuning of the configured model on the workspace's data.

Run it with ``lmforge train CONFIG [--json]`` (or ``python -m lmforge.train CONFIG``). It checks
its inputs before any worker starts, hands one job to :func:`lmforge.train.launch.fit` (in this
process or as Ray Train workers), and writes ``runs/<run_id>/train_result.json`` and the ``train``
state hand-off that evaluate and register read. Given an MLflow experiment (``lmforge train`` and the
pipeline pass ``registry.experiment``), the run is tracked live from its start
(:mod:`lmforge.tracking.live`); its id goes into the hand-off, and register reuses that run.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lmforge.config.model import ModelConfig
from lmforge.config.platform import PlatformConfig
from lmforge.config.tokenize import TokenizeConfig
from lmforge.config.training import TrainingConfig
from lmforge.core.storage import open_store
from lmforge.core.storage.view import local_view
from lmforge.core.workspace import Workspace
from lmforge.stages.base_model import check_base_tokenizer, check_continuable, resolve_base
from lmforge.tracking.live import LiveRun, mark_failed
from lmforge.tracking.mlflow_tracker import mlflow_client, mlflow_uris
from lmforge.train.launch import check_inputs, fit, training_inputs
from lmforge.train.methods.catalog import method_info
from lmforge.train.recovery import resolve_resume

DEFAULT_HELDOUT_FRACTION: float = TokenizeConfig.model_fields["finetune_heldout_fraction"].default


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    model_dir: Path
    adapter_dir: Path | None
    history: list[dict] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    mlflow_run_id: str | None = None  # the MLflow run that tracked training live (None: untracked)
    mlflow_tracking_uri: str | None = None
    restarts: int = 0  # how often Ray Train restarted the workers after a failure (from the latest checkpoint)
    resumed_from_step: int = 0  # the step the final attempt resumed after (--resume or a restart); 0: from the start

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model_dir"] = str(self.model_dir)
        out["adapter_dir"] = str(self.adapter_dir) if self.adapter_dir else None
        return out


def train(training: TrainingConfig, model_cfg: ModelConfig, ws: Workspace, run_name: str | None = None,
          progress: Callable[[dict], None] | None = None, ray_address: str | None = None,
          resume: str | None = None, finetune_heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
          experiment: str | None = None, platform: PlatformConfig | None = None,
          report: Callable[[dict], None] | None = None, hand_off: bool = True) -> TrainResult:
    """Train a model from ``ws``'s tokenizer and data; return where it is and how it went.

    ``progress`` receives each history row as it is made (in-line and under Ray).
    Env ``RAY_ADDRESS`` (else ``ray_address``, i.e. ``platform.ray_address``) names an existing
    cluster; otherwise a local Ray is started when ``training.placement.use_ray`` is set. ``resume`` names
    an earlier run whose latest checkpoint this run continues exactly (same model and method);
    ``"latest"`` names the newest run that left a checkpoint (:func:`lmforge.train.recovery.resolve_resume`).
    ``finetune_heldout_fraction`` is the pipeline's ``tokenize.finetune_heldout_fraction``: when
    no tokenized datasets fit, fine-tuning holds out those SFT records itself, as tokenize would.
    ``experiment`` (``registry.experiment``) opens an MLflow run in it (at ``platform``'s tracking URI)
    before any check: params at once, metrics and system metrics while training runs, FAILED with
    the error if anything here raises; None trains without MLflow.
    A registered ``model.base_model`` (``models:/NAME@champion``) is resolved here, in ``platform``'s
    registry (:mod:`lmforge.stages.base_model`): the workers load its downloaded directory, the params
    keep the URI, and the version it named is recorded as ``lmforge.base_model_*`` tags and params.
    ``report`` receives every record the loop makes (history rows and validation values: a tune trial
    reports its validation loss to Ray Tune from it); ``hand_off`` false leaves the ``train`` state
    hand-off as it is (a tune trial is not the workspace's trained model).
    """
    started = time.perf_counter()
    resume = resolve_resume(ws, resume)
    run_id = resume or _new_run_id(run_name)
    live = LiveRun.open(ws, platform, experiment, run_id, resume=bool(resume)) if experiment else None
    try:
        base = resolve_base(model_cfg, ws, platform)
        # On an object store the checks read cached copies of the inputs (the workers read the same cache here).
        with local_view(ws, training_inputs(ws) if ws.is_remote else ()) as view:
            check_base_tokenizer(base, view.tokenizer_dir)
            check_continuable(base, training)
            check_inputs(training, base.model, view)
        job = {"training": training.model_dump(mode="json"), "model": base.model.model_dump(mode="json"),
               "home": ws.location, "run_id": run_id, "resume": bool(resume),
               "finetune_heldout_fraction": finetune_heldout_fraction,
               "base_adapter": str(base.adapter) if base.adapter else None}
        # The config as written (a models:/ URI, never the download's path) plus the version it named.
        config_params = {**_flatten({"training": job["training"], "model": model_cfg.model_dump(mode="json")}),
                         **base.lineage()}
        if live is not None:
            live.tracker.set_tags(base.lineage())
            live.log_params(config_params)
        outcome = fit(job, training, ws, ray_address, progress,
                      report=_both(live.report if live else None, report))
        if live is not None:
            final_step = max((int(row["step"]) for row in outcome["history"]), default=0)
            live.finish(outcome["params"], outcome["metrics"], final_step)
    except BaseException as exc:
        if live is not None:
            live.fail(exc)
        raise
    run_dir = ws.runs_dir / run_id
    adapted = training.finetunes and method_info(training.method).adapts
    result = TrainResult(run_id=run_id, model_dir=run_dir / "model",
                         adapter_dir=run_dir / "adapter" if adapted else None,
                         history=outcome["history"], metrics=outcome["metrics"],
                         params={**config_params, **outcome["params"]},
                         duration_s=round(time.perf_counter() - started, 3),
                         mlflow_run_id=live.run_id if live else None,
                         mlflow_tracking_uri=live.tracking_uri if live else None,
                         restarts=outcome["restarts"], resumed_from_step=outcome["resumed_from_step"])
    open_store(ws).atomic_write_json(run_dir / "train_result.json", result.as_dict())
    if hand_off:
        ws.write_state("train", result.as_dict())
    return result


def tracked_run(trained: dict[str, Any], platform: PlatformConfig | None, ws: Workspace) -> str | None:
    """The MLflow run that tracked a training (its ``train`` hand-off), when it lives at the tracking
    URI ``platform`` names now; None for an untracked run or one in another store."""
    run_id, uri = trained.get("mlflow_run_id"), trained.get("mlflow_tracking_uri")
    return run_id if run_id and uri == mlflow_uris(ws, platform)[0] else None


def record_failure(trained: dict[str, Any], platform: PlatformConfig | None, ws: Workspace, stage: str,
                   error: BaseException) -> None:
    """End a training's MLflow run FAILED when a later stage (evaluate) fails on its model."""
    run_id = tracked_run(trained, platform, ws)
    if run_id is not None:
        mark_failed(mlflow_client(ws, platform), run_id, stage, error)


def _both(first: Callable[[dict], None] | None, second: Callable[[dict], None] | None) -> Callable[[dict], None] | None:
    """One record sink that feeds both (either may be None)."""
    if first is None or second is None:
        return first or second

    def deliver(record: dict) -> None:
        first(record)
        second(record)

    return deliver


def _new_run_id(run_name: str | None) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name or "train").strip("-.") or "train"
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{stem}-{stamp}-{uuid.uuid4().hex[:6]}"


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = ",".join(map(str, value)) if isinstance(value, list) else value
    return flat
