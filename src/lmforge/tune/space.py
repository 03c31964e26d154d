"""The search space: ``tune.space`` as Ray Tune samplers, and a trial's sampled values as a config."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from lmforge.config.training import TrainingConfig
from lmforge.config.tune import Distribution


def samplers(space: dict[str, Distribution]) -> dict[str, Any]:
    """Ray Tune's ``param_space``: one sampler per dotted key (the keys stay flat, dots and all)."""
    from ray import tune

    make: dict[str, Callable[..., Any]] = {"loguniform": tune.loguniform, "uniform": tune.uniform, "quniform": tune.quniform,
            "qloguniform": tune.qloguniform, "randint": tune.randint, "lograndint": tune.lograndint}
    out: dict[str, Any] = {}
    for key, distribution in space.items():
        if distribution.kind == "choice":
            out[key] = tune.choice(distribution.args)
        else:
            out[key] = make[distribution.kind](*distribution.args)
    return out


def with_values(raw: dict[str, Any], sampled: dict[str, Any]) -> dict[str, Any]:
    """A copy of the config mapping ``raw`` with each dotted key of ``sampled`` set to its value."""
    out = copy.deepcopy(raw)
    for key, value in sampled.items():
        *groups, leaf = key.split(".")
        node = out
        for group in groups:
            node = node.setdefault(group, {})
        node[leaf] = value.item() if hasattr(value, "item") else value  # numpy scalars from the samplers
    return out


def default_metric(training: TrainingConfig) -> str:
    """The validation loss of the last phase a trial trains (the loop reports ``<phase>_val_loss``)."""
    return "finetune_val_loss" if training.finetunes else "pretrain_val_loss"


def validations(training: TrainingConfig) -> int:
    """How many validations the last phase reports (before its first step, every ``every`` steps, after the
    last): ASHA's horizon (``max_t``) in the unit it counts, reports."""
    phase = training.finetune if training.finetunes else training.pretrain
    every = training.validation.every
    return 2 + (len(range(every, phase.steps, every)) if every else 0)
