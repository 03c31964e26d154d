"""Benchmark tasks through lm-evaluation-harness (``lm-eval``), run in-process on an already-loaded model.

The tasks are the harness's own (task YAML files the user points at with ``evaluation.tasks``);
nothing here re-implements one. Only the user's paths are indexed (never the harness's built-in
catalogue), and a task's data must be local files (``dataset_path: json`` with
``dataset_kwargs: {data_files: ...}``): nothing is fetched from a hub (``HF_HUB_OFFLINE=1``).

Scores come back as ``{task: {metric: value}}``; a metric reported under a filter other than the
default ``none`` is named ``metric_filter`` (``exact_match_strict-match``). :func:`task_metrics`
flattens them to MLflow metric names ``task/<task>/<metric>``.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.core.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lmforge.model.types import CausalLM

TaskScores = dict[str, dict[str, float]]
_MLFLOW_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")
_TASK_FIX = "point evaluation.tasks at lm-evaluation-harness task YAML files (or directories of them)"


def task_specs(paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """(what to run, directories to index) for ``evaluation.tasks``: a file runs itself, a directory
    runs every task defined in it."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ConfigError("evaluation.tasks is set but lm-evaluation-harness is not installed",
                          "install it with `pip install -e '.[eval]'` (`make install` does)") from exc

    specs: list[str] = []
    include: list[str] = []
    for raw in paths:
        path = Path(raw).expanduser().resolve()
        if path.is_file() and path.suffix in (".yaml", ".yml"):
            specs.append(str(path))
            include.append(str(path.parent))  # siblings a task includes or a group names
        elif path.is_dir():
            found = TaskManager(include_path=str(path), include_defaults=False).all_subtasks
            if not found:
                raise ConfigError(f"evaluation.tasks: {raw} holds no lm-evaluation-harness task YAML", _TASK_FIX)
            specs.extend(found)
            include.append(str(path))
        else:
            raise ConfigError(f"evaluation.tasks: {raw} is neither a task YAML file nor a directory", _TASK_FIX)
    return specs, sorted(set(include))


def run_tasks(model: CausalLM, tokenizer: PreTrainedTokenizerBase, paths: Sequence[str], *, batch_size: int,
              max_length: int, limit: int | None) -> TaskScores:
    """Score ``model`` on the tasks at ``paths`` with lm-evaluation-harness; fixed seeds, no request cache."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    specs, include = task_specs(paths)
    # HFLM wraps the loaded model as it is (dtype, device, adapters applied): the harness scores
    # exactly what the evaluate stage scores.
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    try:
        output = simple_evaluate(
            model=lm, tasks=specs, task_manager=TaskManager(include_path=include, include_defaults=False),
            limit=limit, log_samples=False, bootstrap_iters=1000, random_seed=0, numpy_random_seed=0,
            torch_random_seed=0, fewshot_random_seed=0,
        )
    except (KeyError, ValueError, FileNotFoundError) as exc:
        raise DataError(f"lm-evaluation-harness could not run {', '.join(paths)}: {exc}",
                        "check the task YAML (task name, dataset_path: json, data_files paths) and its data") from exc
    if output is None:  # only a non-zero rank of a distributed run gets None; this runs on one process
        raise DataError("lm-evaluation-harness returned no results", _TASK_FIX)
    return scores_from_results(output["results"])


def scores_from_results(results: dict[str, dict[str, Any]]) -> TaskScores:
    """``{task: {metric: value}}`` from the harness's ``results`` table: numbers only, filter folded in."""
    scores: TaskScores = {}
    for task, row in results.items():
        values: dict[str, float] = {}
        for key, value in row.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, int | float):
                continue  # "alias", "samples" and "N/A" stderr entries
            metric, _, filt = key.partition(",")
            name = metric if filt == "none" else f"{metric}_{filt}"
            if math.isfinite(value):
                values[name] = float(value)
        scores[task] = dict(sorted(values.items()))
    return dict(sorted(scores.items()))


def task_metrics(scores: TaskScores) -> dict[str, float]:
    """The flat MLflow metrics of ``scores``: ``task/<task>/<metric>`` (characters MLflow refuses become _)."""
    return {_MLFLOW_UNSAFE.sub("_", f"task/{task}/{metric}"): value
            for task, metrics in scores.items() for metric, value in metrics.items()}


def task_table(scores: TaskScores) -> str:
    """One CSV row per (task, metric, value): the table artifact beside the eval report."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["task", "metric", "value"])
    for task, metrics in scores.items():
        for metric, value in metrics.items():
            writer.writerow([task, metric, repr(value)])
    return buffer.getvalue()


def run_endpoint_tasks(base_url: str, model: str, tokenizer_dir: Path, paths: Sequence[str], *, max_length: int,
                       limit: int | None) -> TaskScores:
    """Score the OpenAI-compatible server at ``base_url`` on the tasks at ``paths`` (``local-completions``).

    Loglikelihood tasks need ``echo`` with prompt ``logprobs`` from ``/v1/completions`` (lmforge's
    server has them). Requests carry text, one per request; ``tokenizer_dir`` is the served model's
    tokenizer, which the harness uses to find where a continuation starts in the echoed tokens.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    specs, include = task_specs(paths)
    model_args = {
        "base_url": f"{base_url.rstrip('/')}/v1/completions", "model": model, "tokenizer_backend": "huggingface",
        "tokenizer": str(tokenizer_dir), "tokenized_requests": False, "num_concurrent": 1, "max_retries": 2,
        "max_length": max_length, "batch_size": 1,
    }
    try:
        output = simple_evaluate(
            model="local-completions", model_args=model_args,
            task_manager=TaskManager(include_path=include, include_defaults=False), tasks=specs, limit=limit,
            log_samples=False, bootstrap_iters=1000, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
            fewshot_random_seed=0,
        )
    except (KeyError, ValueError, FileNotFoundError) as exc:
        raise DataError(f"lm-evaluation-harness could not run {', '.join(paths)} against {base_url}: {exc}",
                        "check the task YAML and that the server answers /v1/completions") from exc
    if output is None:
        raise DataError("lm-evaluation-harness returned no results", _TASK_FIX)
    return scores_from_results(output["results"])
