"""The ``tune`` section: hyperparameter search over the training and model sections (``lmforge tune``).

``space`` maps a dotted config key (``training.finetune.learning_rate``) to one distribution
(``{loguniform: [1e-5, 1e-2]}``); each trial trains the pipeline config with its sampled values in
place (:mod:`lmforge.stages.tune`). Every key, distribution and bound is checked here, when the file
is read, so a typo fails before Ray starts: the key must be a field of ``training`` or ``model`` (the
sections a trial trains with), and each bound must be a value that field accepts.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import Field, TypeAdapter, ValidationError, model_validator
from pydantic.fields import FieldInfo

from lmforge.config.base import Section
from lmforge.config.model import ModelConfig
from lmforge.config.training import TrainingConfig

# The sections a trial trains with; a key elsewhere (data, serving ...) would change nothing a trial measures.
TUNABLE_SECTIONS: dict[str, type[Section]] = {"training": TrainingConfig, "model": ModelConfig}
# Distributions that draw integers; an integer field takes only these (or a choice of integers).
INTEGER_DISTRIBUTIONS = ("randint", "lograndint", "choice")


class Distribution(Section):
    """One search-space entry: exactly one of the keys below, as Ray Tune's sampling functions take them."""

    loguniform: list[float] | None = Field(None, description="[low, high], 0 < low < high: uniform in log space.")
    uniform: list[float] | None = Field(None, description="[low, high], low < high.")
    quniform: list[float] | None = Field(None, description="[low, high, q]: uniform, rounded to a multiple of q.")
    qloguniform: list[float] | None = Field(None, description="[low, high, q]: log-uniform, rounded to a multiple of q.")
    randint: list[int] | None = Field(None, description="[low, high]: an integer, low included, high excluded.")
    lograndint: list[int] | None = Field(None, description="[low, high]: an integer uniform in log space, high excluded.")
    choice: list[Any] | None = Field(None, description="[a, b, ...]: one of the listed values.")

    @property
    def kind(self) -> str:
        """The one distribution given (``loguniform``, ``choice`` ...)."""
        return next(name for name in type(self).model_fields if getattr(self, name) is not None)

    @property
    def args(self) -> list[Any]:
        return list(getattr(self, self.kind))

    def candidates(self) -> list[Any]:
        """The extreme values a trial can draw (every value of a choice): each must be valid for the key."""
        args = self.args
        if self.kind == "choice":
            return args
        if self.kind in ("randint", "lograndint"):
            return [args[0], args[1] - 1]  # Ray's upper bound is excluded
        return args[:2]

    @model_validator(mode="after")
    def _one_valid_distribution(self) -> Distribution:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one distribution ({', '.join(type(self).model_fields)}), got "
                             f"{given or 'none'}")
        kind, args = given[0], self.args
        if kind == "choice":
            if not args:
                raise ValueError("choice needs at least one value")
            return self
        want = 3 if kind.startswith("q") else 2
        if len(args) != want:
            raise ValueError(f"{kind} takes [low, high{', q' if want == 3 else ''}], got {args}")
        low, high = args[0], args[1]
        if not low < high:
            raise ValueError(f"{kind}: low ({low}) must be below high ({high})")
        if "log" in kind and low <= 0:
            raise ValueError(f"{kind}: low ({low}) must be above 0 (a log scale)")
        if want == 3 and args[2] <= 0:
            raise ValueError(f"{kind}: q ({args[2]}) must be above 0")
        return self


class AshaConfig(Section):
    """ASHA (asynchronous successive halving): stop trials whose validation loss lags behind the others'."""

    grace_period: int = Field(1, ge=1, le=1_000_000, description="Validations a trial runs before ASHA may stop it.")
    reduction_factor: float = Field(2.0, gt=1, le=100, description="At each rung only the best 1/reduction_factor "
                                    "of the trials go on.")


class TrialResources(Section):
    """What each trial reserves in Ray; max_concurrent trials run side by side when the cluster has room."""

    cpus: float = Field(1.0, gt=0, le=1024, description="Logical CPUs per trial (its torch threads on CPU).")
    gpus: float = Field(0.0, ge=0, le=64, description="GPUs per trial (fractions share one GPU); above 0 trains "
                        "on the GPU (training.placement.use_gpu).")


class TuneConfig(Section):
    """Hyperparameter search with Ray Tune: each trial an in-line training run, one nested MLflow run."""

    space: dict[str, Distribution] = Field(
        default_factory=dict, description="Dotted key of the training or model section -> one distribution, e.g. "
        "{training.finetune.learning_rate: {loguniform: [1.0e-5, 1.0e-2]}, training.lora.r: {choice: [8, 16]}}.",
    )
    metric: str | None = Field(
        None, description="The reported value to optimize: null is the validation loss of the last phase "
        "(finetune_val_loss, or pretrain_val_loss for method pretrain).",
    )
    mode: Literal["min", "max"] = Field("min", description="Whether a smaller or larger metric is better.")
    max_trials: int = Field(8, ge=1, le=100_000, description="Trials sampled from the space.")
    max_concurrent: int = Field(2, ge=1, le=4096, description="Trials that run at the same time at most.")
    scheduler: Literal["asha", "none"] = Field(
        "asha", description="asha: stop lagging trials early on the validation loss; none: every trial runs to its end.",
    )
    asha: AshaConfig = Field(default_factory=AshaConfig)
    searcher: Literal["random", "optuna"] = Field(
        "random", description="random: independent samples; optuna: Optuna's TPE (needs `pip install optuna`).",
    )
    seed: int | None = Field(0, ge=0, le=2**32 - 1, description="Seed of the searcher's samples; null: unseeded.")
    resources: TrialResources = Field(default_factory=TrialResources)
    max_failures: int = Field(
        1, ge=0, le=1000, description="Times a failed or killed trial is restarted (from its latest checkpoint) "
        "before it is recorded as failed; a failed trial never stops the search.",
    )
    register_best: bool = Field(
        False, description="Train the best trial's config through the train stage and register it (MLflow), as "
        "`lmforge train` + `lmforge promote` would.",
    )

    @model_validator(mode="after")
    def _space_keys(self) -> TuneConfig:
        for key, distribution in self.space.items():
            check_key(key, distribution)
        return self


def check_key(key: str, distribution: Distribution) -> None:
    """Refuse a search-space key that is not a leaf field of training or model, or a bound it cannot take."""
    section, _, rest = key.partition(".")
    model: type[Section] | None = TUNABLE_SECTIONS.get(section)
    if model is None or not rest:
        raise ValueError(f"space key {key!r}: the space holds keys of the {' or '.join(TUNABLE_SECTIONS)} section, "
                         "dotted (training.finetune.learning_rate)")
    parts = rest.split(".")
    leaf: FieldInfo | None = None
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            where = ".".join([section, *parts[:depth]])
            raise ValueError(f"space key {key!r}: {where} has no key {part!r} (its keys: "
                             f"{', '.join(model.model_fields)})")
        kind = field.annotation
        if depth < len(parts) - 1:
            if not (isinstance(kind, type) and issubclass(kind, Section)):
                raise ValueError(f"space key {key!r}: {'.'.join([section, *parts[:depth + 1]])} is a value, not a group")
            model = kind
        elif isinstance(kind, type) and issubclass(kind, Section):
            raise ValueError(f"space key {key!r} is a group: name one of its keys ({', '.join(kind.model_fields)})")
        leaf = field
    assert leaf is not None  # the loop ran at least once (rest is not empty) or raised
    if _is_int(leaf.annotation) and distribution.kind not in INTEGER_DISTRIBUTIONS:
        raise ValueError(f"space key {key!r} takes whole numbers: use randint, lograndint or choice, not "
                         f"{distribution.kind}")
    # The field's type with its bounds (gt, le ...), checked alone: Annotated needs at least one bound.
    target: Any = Annotated[(leaf.annotation, *leaf.metadata)] if leaf.metadata else leaf.annotation
    adapter: TypeAdapter[Any] = TypeAdapter(target)
    for value in distribution.candidates():
        try:
            adapter.validate_python(value, strict=isinstance(value, bool))
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"]
            raise ValueError(f"space key {key!r}: {value!r} is not a valid value ({reason}); keep the bounds inside "
                             "what the key accepts (`lmforge config schema`)") from None


def _is_int(kind: Any) -> bool:
    options = get_args(kind) if get_origin(kind) in (Union, types.UnionType) else (kind,)
    return int in options and float not in options
