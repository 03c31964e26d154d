"""Typed configuration: stage models (``stages``) and the YAML loader (``loader``)."""

from lmforge.config.loader import config_hash, load_config, parse_config
from lmforge.config.sources import FeedSource, FetchConfig, HFSource, ParallelConfig, S3Source, WebSource
from lmforge.config.stages import (
    CurationConfig,
    DataConfig,
    EvaluationConfig,
    LocalSource,
    LoraConfig,
    ModelConfig,
    PhaseConfig,
    PipelineConfig,
    PlatformConfig,
    RegistryConfig,
    ServingConfig,
    StdlibSource,
    TrainingConfig,
    ValidationConfig,
)

__all__ = [
    "CurationConfig", "DataConfig", "EvaluationConfig", "LocalSource", "LoraConfig", "ModelConfig",
    "PhaseConfig", "PipelineConfig", "PlatformConfig", "RegistryConfig", "ServingConfig", "StdlibSource",
    "TrainingConfig", "ValidationConfig", "config_hash", "load_config", "parse_config",
    "FeedSource", "FetchConfig", "HFSource", "ParallelConfig", "S3Source", "WebSource",
]
