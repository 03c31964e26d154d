"""Prefect tasks for tokenizer training and model training (Ray Train inside the engine)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from lmforge.config import ModelConfig, PipelineConfig, PlatformConfig, TrainingConfig, ValidationConfig
from lmforge.config.tokenize import TokenizeConfig
from lmforge.core.workspace import Workspace
from tasks._publish import announce, publish

if TYPE_CHECKING:
    from lmforge.stages.base_model import ContinueFrom


@task(name="tokenize", retries=1, cache_policy=NO_CACHE)
def tokenize_task(cfg: TokenizeConfig, model: ModelConfig, training: TrainingConfig,
                  validation: ValidationConfig, platform: PlatformConfig | None = None) -> str:
    announce("tokenize", "tokenizer and tokenized datasets (validated)")
    from lmforge.core.errors import ValidationFailed
    from lmforge.stages.tokenize import tokenize
    from lmforge.stages.validate import validate_tokenized

    ws = Workspace.from_env()
    result = tokenize(cfg, model, training, ws, platform=platform).as_dict()
    try:
        if result["digest"]:
            validate_tokenized(validation, ws)
    except ValidationFailed as exc:
        publish("tokenize", {**result, "validation": exc.report or str(exc)}, "tokenized data gate FAILED")
        raise
    publish("tokenize", result, f"tokenized datasets {str(result['digest'])[:12]}")
    return result["tokenizer_dir"]


# No retries: a diverged run is not fixed by running it again with the same settings.
@task(name="train", cache_policy=NO_CACHE, timeout_seconds=6 * 3600)
def train_task(training: TrainingConfig, model: ModelConfig, platform: PlatformConfig,
               finetune_heldout_fraction: float, experiment: str | None = None,
               resume: str | None = None) -> dict[str, Any]:
    """``experiment`` (``registry.experiment``): the MLflow experiment that tracks the run live.
    ``resume``: a stopped run's id (or ``latest``) to continue from its latest checkpoint instead of training anew."""
    announce("train", "pretraining, then fine-tuning")
    from lmforge.stages.train import train

    result = train(training, model, Workspace.from_env(), ray_address=platform.ray_address,
                   finetune_heldout_fraction=finetune_heldout_fraction, experiment=experiment,
                   platform=platform, resume=resume).as_dict()
    summary = {k: v for k, v in result.items() if k != "history"}
    publish("train", summary, f"model at {result['model_dir']}")
    return result


@task(name="choose-base", retries=1, cache_policy=NO_CACHE)
def choose_base_task(config: PipelineConfig, continue_from: ContinueFrom, scheduled: bool) -> PipelineConfig:
    """``config`` with the ``model.base_model`` this run starts from (:func:`lmforge.stages.base_model.continued`)."""
    from lmforge.stages.base_model import continued

    chosen = continued(config, continue_from, scheduled, Workspace.from_env())
    if chosen.model.base_model != config.model.base_model:
        get_run_logger().info(f"continue_from {continue_from}: training starts from {chosen.model.base_model}")
    return chosen


def record_failure(platform: PlatformConfig, trained: dict[str, Any], stage: str, error: BaseException) -> None:
    """Mark the training's MLflow run FAILED with ``error`` when ``stage``, after training, fails."""
    from lmforge.stages.train import record_failure as record

    record(trained, platform, Workspace.from_env(), stage, error)
