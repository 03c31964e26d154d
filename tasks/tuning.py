"""Prefect task for hyperparameter search (Ray Tune inside the engine)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from lmforge.config import PipelineConfig
from lmforge.core.workspace import Workspace
from tasks._publish import publish


# No retries: the search retries its own trials (tune.max_failures); a rerun would start every trial again.
@task(name="tune", cache_policy=NO_CACHE, timeout_seconds=24 * 3600)
def tune_task(config: PipelineConfig) -> dict[str, Any]:
    # Not one of the pipeline's numbered stages (announce counts those): a plain line instead.
    get_run_logger().info("tune: hyperparameter search (Ray Tune)")
    from lmforge.stages.tune import tune

    result = tune(config, Workspace.from_env()).as_dict()
    summary = {k: v for k, v in result.items() if k != "trial_outcomes"}
    publish("tune", summary, f"best {result['metric']} {result['best']['metric']:.4g} of {result['trials']} trials")
    return result
