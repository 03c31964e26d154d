"""One frozen pydantic model per pipeline stage, composed into :class:`PipelineConfig`.

Every model forbids unknown keys, so a typo in a YAML file is an error instead of a silent
default. Field descriptions are the help text shown by ``lmforge config schema`` and rendered as
form hints in the Prefect UI, where these same models are the flow's parameters.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- data


# The collect stage's sources and settings live in their own module (one model per source type).
from lmforge.config.sources import (  # noqa: E402,F401
    DataConfig,
    FeedSource,
    FetchConfig,
    HFSource,
    InstructionConfig,
    LocalSource,
    ParallelConfig,
    S3Source,
    SourceConfig,
    StdlibSource,
    WebSource,
)


# ---------------------------------------------------------------- curation, validation, tokenization

# The data-preparation sections live in their own module (many small step configs).
from lmforge.config.curation import CurationConfig, TokenizeConfig, ValidationConfig  # noqa: E402,F401


# ---------------------------------------------------------------- model and training
# Defined in lmforge.config.training (the train stage's own module), re-exported here.
from lmforge.config.training import (  # noqa: E402
    AdapterConfig,
    IA3Config,
    LoraConfig,
    ModelConfig,
    PhaseConfig,
    PromptLearningConfig,
    TrainingConfig,
)


# ---------------------------------------------------------------- evaluation, registry, serving


class EvaluationConfig(StageConfig):
    max_batches: int = Field(20, gt=0, description="Held-out batches for perplexity.")
    max_examples: int = Field(40, gt=0, description="Held-out instructions for exact match and ROUGE-L.")
    max_new_tokens: int = Field(32, gt=0)
    batch_size: int = Field(8, gt=0, description="Sequences per forward pass (perplexity blocks and prompts).")
    block_size: int = Field(
        128, ge=8, description="Tokens per held-out perplexity block; capped at the model's context window."
    )


class RegistryConfig(StageConfig):
    model_name: str = Field("lmforge-demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    experiment: str = Field("lmforge", min_length=1)
    alias: str = Field("champion", pattern=r"^[a-z][a-z0-9_-]*$")
    metric: str = Field("eval_perplexity", description="Metric that decides promotion.")
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher is better.")
    min_improvement: float = Field(
        0.01, ge=0, description="Relative margin the candidate must beat the champion by (0.01 = 1%)."
    )


from lmforge.config.serving import ServingConfig  # noqa: E402 - the serving section lives in its own module


class PlatformConfig(StageConfig):
    """Where each part runs. Empty values mean the embedded default inside LMFORGE_HOME."""

    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow server URI; default sqlite in the workspace (env MLFLOW_TRACKING_URI wins)."
    )
    ray_address: str | None = Field(None, description="Existing Ray cluster; default a local Ray (env RAY_ADDRESS).")
    schedule_cron: str = Field("0 3 * * 0", description="Retraining schedule of the `lmforge ui` deployment.")


class PipelineConfig(StageConfig):
    data: DataConfig = Field(default_factory=DataConfig)
    curation: CurationConfig = Field(default_factory=CurationConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    platform: PlatformConfig = Field(default_factory=PlatformConfig)
