"""The tune stage: hyperparameter search over the training and model sections with Ray Tune.

Run it with ``lmforge tune CONFIG [--json]`` (or the Prefect flow ``lmforge-tune``) after
``lmforge tokenize``. Every search-space bound is checked against the whole config before Ray
starts; then each trial trains the config with its sampled values in-line inside its Ray Tune trial
(one process, ``training.placement.use_ray`` false), reporting the last phase's validation loss at
each validation so ASHA can stop it. One parent MLflow run (in ``registry.experiment``) holds one
nested run per trial (:mod:`lmforge.tune.runs`). The best trial's config goes to
``tune/<tune_id>/best.yaml`` (a pipeline config: ``lmforge train tune/<tune_id>/best.yaml``) beside
``result.json`` and the ``search.json`` written at the start (``lmforge tune CONFIG --resume`` continues a
stopped search: :mod:`lmforge.tune.resume`); with ``tune.register_best`` it is trained, evaluated and registered through the
train, evaluate and register stages. The trials' models stay in ``runs/<tune_id>-<trial_id>/``.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from lmforge.config.loader import parse_config
from lmforge.config.pipeline import PipelineConfig
from lmforge.core.errors import ConfigError, LmforgeError
from lmforge.core.storage import open_store
from lmforge.core.workspace import Workspace
from lmforge.stages.train import train
from lmforge.tracking.live import mark_failed
from lmforge.tracking.mlflow_tracker import flatten_params
from lmforge.train.loop import is_history_row
from lmforge.train.recovery import has_checkpoint, ray_storage_args
from lmforge.tune.resume import record_start, reopen_parent, resumable
from lmforge.tune.runs import COMPLETED, COMPLETED_KEY, FAILED, STOPPED_EARLY, open_parent, outcome_of, trial_runs
from lmforge.tune.search import check_searcher, run_search, start_ray
from lmforge.tune.space import default_metric, validations, with_values

TUNE_DIR = "tune"  # <home>/tune/<tune_id>/: best.yaml, result.json (Ray Tune's own state: <home>/ray/tune/)
TRAIN_LOSS = "train_loss"  # reported beside the metric: the latest training loss at that step


@dataclass(frozen=True)
class TuneResult:
    tune_id: str
    metric: str
    trials: int
    completed: int
    stopped_early: int
    failed: int
    best: dict[str, Any] | None  # {trial_id, params (the sampled values), metric, run_id}
    mlflow_run_id: str
    best_config: str  # the best trial's pipeline config (YAML)
    trial_outcomes: list[dict[str, Any]] = field(default_factory=list)
    registered: dict[str, Any] | None = None  # tune.register_best: the train run and registered version
    duration_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def tune(config: PipelineConfig, ws: Workspace, resume: str | None = None) -> TuneResult:
    """Search ``config.tune.space``; record every trial; write (and with register_best, register) the best.

    ``resume``: a stopped search's id (or ``latest``) to continue instead (:mod:`lmforge.tune.resume`)."""
    started = time.perf_counter()
    settings = config.tune
    if not settings.space:
        raise ConfigError("tune.space is empty: there is nothing to search",
                          "add keys to tune.space, e.g. training.finetune.learning_rate: {loguniform: [1.0e-4, 1.0e-2]}")
    check_searcher(settings)
    raw = config.model_dump(mode="json")
    metric = settings.metric or default_metric(config.training)
    horizon = check_space(raw)
    if resume:
        tune_id = resumable(ws, ws.home / TUNE_DIR, resume, raw)
    else:
        tune_id = f"tune-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    out_dir = ws.home / TUNE_DIR / tune_id  # written through the workspace's store (an object store too)
    store = open_store(ws)
    if not resume:
        record_start(ws, out_dir, tune_id, raw)
    start_ray(settings, config.platform.ray_address)
    parent = reopen_parent(ws, config.platform, tune_id) if resume else open_parent(
        ws, config.platform, config.registry.experiment, tune_id, {"tune": config.tune.model_dump(mode="json")})
    try:
        callback = trial_runs(parent, tune_id, (metric, TRAIN_LOSS),
                              lambda sampled: _flat(parse_config(with_values(raw, sampled), "the trial's config")))
        grid = run_search(run_trial, {"base": raw, "home": ws.location, "tune_id": tune_id, "metric": metric},
                          settings, metric, horizon, ray_storage_args(ws, "tune"), tune_id, [callback],
                          restore=bool(resume))
        outcomes = [{"trial_id": (r.metrics or {}).get("trial_id") or Path(r.path).name, "outcome": outcome_of(r),
                     "params": dict(r.config or {}), "metric": (r.metrics or {}).get(metric),
                     "error": str(r.error).splitlines()[0] if r.error is not None else None}
                    for r in (grid[i] for i in range(len(grid)))]  # ResultGrid indexes; its stub has no __iter__
        best = _best(grid, metric, settings.mode, tune_id)
        best_config = parse_config(with_values(raw, best["params"]), "the best trial's config")
        best_yaml = yaml.safe_dump(best_config.model_dump(mode="json"), sort_keys=False)
        store.atomic_write_text(out_dir / "best.yaml", best_yaml)
        parent.log_metrics({f"best_{metric}": best["metric"]})
        parent.set_tags({"lmforge.tune.best_trial": best["trial_id"]})
        parent.log_params({f"best.{k}": v for k, v in best["params"].items()})
    except BaseException as exc:
        mark_failed(parent.client, parent.run_id, "tune", exc)
        raise
    count = {kind: sum(o["outcome"] == kind for o in outcomes) for kind in (COMPLETED, STOPPED_EARLY, FAILED)}
    result = TuneResult(tune_id=tune_id, metric=metric, trials=len(outcomes), completed=count[COMPLETED],
                        stopped_early=count[STOPPED_EARLY], failed=count[FAILED], best=best,
                        mlflow_run_id=parent.run_id, best_config=ws.shown(out_dir / "best.yaml"),
                        trial_outcomes=outcomes, duration_s=round(time.perf_counter() - started, 3))
    store.atomic_write_json(out_dir / "result.json", result.as_dict())
    with tempfile.TemporaryDirectory() as copies:  # MLflow logs local files: the same two, on the parent run
        (Path(copies) / "best.yaml").write_text(best_yaml)
        (Path(copies) / "result.json").write_text(json.dumps(result.as_dict(), indent=2, default=str))
        parent.log_artifacts(Path(copies), "tune")
    parent.finish()
    if settings.register_best:
        result = TuneResult(**{**result.as_dict(), "registered": register_best(best_config, ws)})
        store.atomic_write_json(out_dir / "result.json", result.as_dict())
    return result


def check_space(raw: dict[str, Any]) -> int:
    """Build the config at every extreme of every search-space key (each alone), so a bound that the whole
    config refuses fails now, naming the key; returns the most validations any of them reports (ASHA's horizon)."""
    config = parse_config(raw, "the config")
    horizon = validations(config.training)
    for key, distribution in config.tune.space.items():
        for value in distribution.candidates():
            try:
                trial = parse_config(with_values(raw, {key: value}), f"tune.space.{key} = {value!r}")
            except ConfigError as exc:
                raise ConfigError(exc.cause, f"narrow the bounds of tune.space.{key} to values the config accepts "
                                  f"with its other settings ({exc.fix})") from None
            horizon = max(horizon, validations(trial.training))
    return horizon


def run_trial(sampled: dict[str, Any], base: dict[str, Any], home: str, tune_id: str, metric: str) -> None:
    """One trial, in its Ray Tune actor: train ``base`` with ``sampled`` in-line, reporting ``metric``.

    A retried trial (``tune.max_failures``) continues from its own latest checkpoint (same run id)."""
    from ray import tune as ray_tune

    trial_id = ray_tune.get_context().get_trial_id()
    gpus = float(base["tune"]["resources"]["gpus"])
    placed = {**sampled, "training.placement.use_ray": False, "training.placement.use_gpu": gpus > 0,
              "training.cpu_threads": max(1, int(base["tune"]["resources"]["cpus"]))}
    config = parse_config(with_values(base, placed), f"tune trial {trial_id}'s config")
    ws = Workspace.from_env(home)  # a path, or the store's URL: the trial may run on any node
    run_id = f"{tune_id}-{trial_id}"
    resume = run_id if has_checkpoint(ws, run_id) else None
    latest: dict[str, float] = {}
    reported: list[float] = []

    def report(record: dict) -> None:
        if is_history_row(record):
            latest[TRAIN_LOSS] = float(record["loss"])
        elif metric in record:
            reported.append(float(record[metric]))
            ray_tune.report({metric: reported[-1], "step": int(record["step"]), "trial_id": trial_id, **latest})

    result = train(config.training, config.model, ws, run_name=run_id, progress=lambda row: None, resume=resume,
                   finetune_heldout_fraction=config.tokenize.finetune_heldout_fraction, report=report, hand_off=False)
    if not reported:
        raise ConfigError(f"tune.metric {metric!r} was never reported by the training loop",
                          "leave tune.metric empty (the last phase's validation loss) or name a value the loop "
                          "reports at validations (<phase>_val_loss)")
    # Ray marks a scheduler-stopped trial's last result done as well; this last report says it ran to its end
    # (ASHA sees one more report of the same value, which can only end a trial that is ending anyway).
    last_step = max((int(row["step"]) for row in result.history), default=0)
    ray_tune.report({metric: reported[-1], "step": last_step, "trial_id": trial_id, COMPLETED_KEY: 1, **latest})


def register_best(best: PipelineConfig, ws: Workspace) -> dict[str, Any]:
    """Train the best config through the train stage, evaluate and register it, as the pipeline does."""
    from lmforge.stages.evaluate import evaluate
    from lmforge.stages.register import register_trained

    trained = train(best.training, best.model, ws, run_name="tune-best", ray_address=best.platform.ray_address,
                    finetune_heldout_fraction=best.tokenize.finetune_heldout_fraction,
                    experiment=best.registry.experiment, platform=best.platform).as_dict()
    evaluated = evaluate(best.evaluation, Path(trained["model_dir"]), ws, model_name=best.registry.model_name,
                         platform=best.platform).as_dict()
    registered = register_trained(best, ws, trained, evaluated, None)
    return {"train_run_id": trained["run_id"], "version": registered.get("version"),
            "mlflow_run_id": trained.get("mlflow_run_id")}


def _best(grid: Any, metric: str, mode: str, tune_id: str) -> dict[str, Any]:
    try:
        best = grid.get_best_result(metric=metric, mode=mode, scope="last", filter_nan_and_inf=True)
    except RuntimeError:
        best = None
    if best is None or best.metrics.get(metric) is None:
        errors = [str(grid[i].error).splitlines()[0] for i in range(len(grid)) if grid[i].error is not None]
        raise LmforgeError(f"no trial of {tune_id} reported {metric}: {len(errors)} of {len(grid)} failed"
                           + (f", the first with: {errors[0]}" if errors else ""),
                           "fix what the trials' errors say (each is on its nested MLflow run), then run the search "
                           "again")
    return {"trial_id": best.metrics.get("trial_id"), "params": dict(best.config),
            "metric": float(best.metrics[metric]), "run_id": f"{tune_id}-{best.metrics.get('trial_id')}"}


def _flat(config: PipelineConfig) -> dict[str, Any]:
    """The params a trial's run records: its training and model sections, flattened (dotted keys)."""
    return flatten_params({"training": config.training.model_dump(mode="json"),
                           "model": config.model.model_dump(mode="json")})
