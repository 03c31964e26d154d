"""The search's MLflow runs: one parent run, and one nested run per trial written from the driver.

The nested runs are written by a Ray Tune ``Callback`` in the driver process, not by the trials: a
trial ASHA stops is killed mid-step, so it could not close its own run, and one writer keeps a
SQLite store free of lock contention. A trial's run gets the ``mlflow.parentRunId`` tag (MLflow's
nesting), its sampled values as ``tune.<key>`` params beside the full flattened config, the metric
curve at each reported step, and its outcome: ``lmforge.tune.outcome`` is ``completed``,
``stopped_early`` (status KILLED) or ``failed`` (status FAILED, with the error).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lmforge.config.platform import PlatformConfig
from lmforge.core.workspace import Workspace
from lmforge.tracking.live import error_tags
from lmforge.tracking.mlflow_tracker import MlflowTracker

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag (the UI folds the trials under the parent)
TUNE_TAG = "lmforge.tune_id"
OUTCOME_TAG = "lmforge.tune.outcome"
TRIAL_TAG = "lmforge.tune.trial_id"
COMPLETED, STOPPED_EARLY, FAILED = "completed", "stopped_early", "failed"
COMPLETED_KEY = "trial_completed"  # in a trial's last report once its training returned (see stages/tune.py)


def open_parent(ws: Workspace, platform: PlatformConfig | None, experiment: str, tune_id: str,
                params: dict[str, Any]) -> MlflowTracker:
    """The search's parent run, with the tune section (and the space) as params."""
    parent = MlflowTracker.start(ws, platform, experiment, run_name=tune_id, tags={TUNE_TAG: tune_id})
    parent.log_params(params)
    return parent


def trial_runs(parent: MlflowTracker, tune_id: str, metrics: tuple[str, ...],
               params_of: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
    """A Ray Tune callback that keeps one nested run per trial under ``parent``.

    ``params_of(sampled)`` is the trial's full config, flattened; ``metrics`` the reported keys to log."""
    from ray.tune import Callback

    class TrialRuns(Callback):
        def __init__(self) -> None:
            self.runs: dict[str, MlflowTracker] = {}

        def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
            if trial.trial_id in self.runs:  # a retried trial goes on in its run
                return
            earlier = _nested_run(parent, trial.trial_id)  # a resumed search's trial goes on in the run it had
            if earlier is not None:
                self.runs[trial.trial_id] = MlflowTracker(parent.client, earlier)
                parent.client.update_run(earlier, status="RUNNING")
                return
            tags = {PARENT_TAG: parent.run_id, TUNE_TAG: tune_id, TRIAL_TAG: trial.trial_id}
            run = parent.client.create_run(_experiment_of(parent), run_name=f"{tune_id}-{trial.trial_id}", tags=tags)
            tracker = self.runs[trial.trial_id] = MlflowTracker(parent.client, run.info.run_id)
            sampled = dict(trial.config)
            tracker.log_params({**params_of(sampled), **{f"tune.{k}": v for k, v in sampled.items()}})

        def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
            values = {key: result[key] for key in metrics if key in result}
            if trial.trial_id in self.runs and values:
                self.runs[trial.trial_id].log_metrics(values, step=int(result.get("step", iteration)))

        def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
            tracker = self.runs.get(trial.trial_id)
            if tracker is None:
                return
            outcome = COMPLETED if (trial.last_result or {}).get(COMPLETED_KEY) else STOPPED_EARLY
            tracker.set_tags({OUTCOME_TAG: outcome})
            tracker.finish("FINISHED" if outcome == COMPLETED else "KILLED")

        def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
            tracker = self.runs.get(trial.trial_id)
            if tracker is None:
                return
            error = trial.get_error() or RuntimeError(f"trial {trial.trial_id} failed")
            tracker.set_tags({OUTCOME_TAG: FAILED, **error_tags(error, "tune trial")})
            tracker.finish("FAILED")

    return TrialRuns()


def outcome_of(trial_result: Any) -> str:
    """``completed``, ``stopped_early`` or ``failed`` for one entry of Ray Tune's ResultGrid."""
    if trial_result.error is not None:
        return FAILED
    return COMPLETED if (trial_result.metrics or {}).get(COMPLETED_KEY) else STOPPED_EARLY


def _nested_run(parent: MlflowTracker, trial_id: str) -> str | None:
    """The run id a trial got under ``parent`` before the search was stopped, if any."""
    runs = parent.client.search_runs([_experiment_of(parent)],
                                     f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{PARENT_TAG}` = '{parent.run_id}'")
    return runs[0].info.run_id if runs else None


def _experiment_of(parent: MlflowTracker) -> str:
    return parent.client.get_run(parent.run_id).info.experiment_id
