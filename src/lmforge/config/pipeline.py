"""The whole pipeline's config: one section per stage, and the digest recorded as lineage on every run.

:class:`PipelineConfig` is what a YAML file in ``configs/`` holds (read by :mod:`lmforge.config.loader`),
the input of the CLI and the parameters of the Prefect flow. A stage receives only its own section.
"""

from __future__ import annotations

import hashlib
import json

from pydantic import Field, model_validator

from lmforge.config.base import Section
from lmforge.config.curation import CurationConfig
from lmforge.config.data import DataConfig
from lmforge.config.evaluation import EvaluationConfig
from lmforge.config.model import ModelConfig
from lmforge.config.platform import PlatformConfig
from lmforge.config.registry import RegistryConfig
from lmforge.config.serving import ServingConfig
from lmforge.config.tokenize import TokenizeConfig
from lmforge.config.training import TrainingConfig
from lmforge.config.tune import TuneConfig
from lmforge.config.validation import ValidationConfig


class PipelineConfig(Section):
    """Every stage's section, in the order the stages run; missing sections take their defaults."""

    data: DataConfig = Field(default_factory=DataConfig)
    curation: CurationConfig = Field(default_factory=CurationConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)  # lmforge tune: a search over training and model
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    platform: PlatformConfig = Field(default_factory=PlatformConfig)

    @model_validator(mode="after")
    def _tensor_parallel_fits_the_model(self) -> PipelineConfig:
        # Spans two sections; a base_model's head counts are checked by the training workers, which read its config.
        model = self.model
        problem = None if model.base_model else self.training.parallel.model_problem(
            model.architecture, model.num_heads, model.num_kv_heads, model.num_layers)
        if problem is not None:
            raise ValueError(": ".join(problem))
        return self


def config_hash(config: PipelineConfig) -> str:
    """Stable digest of a resolved config, recorded as lineage on every run."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
