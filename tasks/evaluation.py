"""Prefect task for held-out evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from lmforge.config import EvaluationConfig
from lmforge.core.workspace import Workspace
from tasks._publish import announce, publish


@task(name="evaluate", retries=1, cache_policy=NO_CACHE)
def evaluate_task(cfg: EvaluationConfig, model_dir: str) -> dict[str, Any]:
    announce("evaluate", "held-out perplexity, exact match, ROUGE-L")
    from lmforge.stages.evaluate import evaluate

    result = evaluate(cfg, Path(model_dir), Workspace.from_env()).as_dict()
    publish("evaluate", result["metrics"], "held-out metrics")
    return result
