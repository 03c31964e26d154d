"""Prefect tasks for tokenizer training and model training (Ray Train inside the engine)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from lmforge.config import ModelConfig, PlatformConfig, TrainingConfig
from lmforge.workspace import Workspace
from tasks._publish import announce, publish


@task(name="tokenize", retries=1, cache_policy=NO_CACHE)
def tokenize_task(cfg: ModelConfig) -> str:
    announce("tokenize", "training the byte-level BPE tokenizer")
    from lmforge.tokenizer import train_tokenizer

    path = train_tokenizer(cfg, Workspace.from_env())
    publish("tokenize", {"tokenizer_dir": str(path), "vocab_size": cfg.vocab_size})
    return str(path)


# No retries: a diverged run is not fixed by running it again with the same settings.
@task(name="train", cache_policy=NO_CACHE, timeout_seconds=6 * 3600)
def train_task(training: TrainingConfig, model: ModelConfig, platform: PlatformConfig) -> dict[str, Any]:
    announce("train", "pretraining, then fine-tuning")
    from lmforge.train.launch import train

    result = train(training, model, Workspace.from_env(), ray_address=platform.ray_address).as_dict()
    summary = {k: v for k, v in result.items() if k != "history"}
    publish("train", summary, f"model at {result['model_dir']}")
    return result
