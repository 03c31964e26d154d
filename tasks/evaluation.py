"""Prefect task for held-out evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from lmforge.config import EvaluationConfig, PlatformConfig
from lmforge.core.workspace import Workspace
from tasks._publish import announce, publish


@task(name="evaluate", retries=1, cache_policy=NO_CACHE)
def evaluate_task(cfg: EvaluationConfig, model_dir: str, model_name: str | None = None,
                  platform: PlatformConfig | None = None) -> dict[str, Any]:
    announce("evaluate", "held-out perplexity, bits per byte, exact match, ROUGE-L, tasks")
    from lmforge.stages.evaluate import evaluate

    result = evaluate(cfg, Path(model_dir), Workspace.from_env(), model_name=model_name, platform=platform).as_dict()
    publish("evaluate", result["metrics"], "held-out metrics")
    return result


@task(name="evaluate-endpoint", retries=1, cache_policy=NO_CACHE)
def evaluate_endpoint_task(cfg: EvaluationConfig, deployed: dict[str, Any],
                           platform: PlatformConfig | None = None) -> dict[str, Any]:
    announce("deploy", "lm-eval tasks against the served endpoint")
    from lmforge.stages.evaluate import evaluate_endpoint

    result = evaluate_endpoint(cfg, deployed, Workspace.from_env(), platform)
    publish("evaluate-endpoint", result["metrics"], "task scores of the served endpoint")
    return result
