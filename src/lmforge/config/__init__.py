"""Typed configuration: one module per pipeline section, composed in ``pipeline``, read by ``loader``.

``base.Section`` is the one base class (frozen, unknown keys are errors). Each section lives in its
own module (``data``, ``curation``, ``validation``, ``tokenize``, ``model``, ``training``,
``evaluation``, ``registry``, ``serving``, ``platform``); engine code imports from that module, and
this package re-exports the public classes for scripts and users (``from lmforge.config import
TrainingConfig``).
"""

from lmforge.config.base import Section, updated
from lmforge.config.curation import CurationConfig
from lmforge.config.data import (
    DataConfig,
    FeedSource,
    FetchConfig,
    HFSource,
    InstructionConfig,
    LocalSource,
    ParallelConfig,
    S3Source,
    StdlibSource,
    WebSource,
)
from lmforge.config.evaluation import EvaluationConfig
from lmforge.config.loader import load_config, parse_config, parse_section
from lmforge.config.model import ModelConfig
from lmforge.config.pipeline import PipelineConfig, config_hash
from lmforge.config.platform import PlatformConfig
from lmforge.config.registry import RegistryConfig
from lmforge.config.serving import KVCacheConfig, RuntimeConfig, SchedulerConfig, ServerConfig, ServingConfig
from lmforge.config.tokenize import TokenizeConfig
from lmforge.config.training import (
    AdapterConfig,
    CheckpointingConfig,
    IA3Config,
    LoggingConfig,
    LoraConfig,
    LossConfig,
    OptimizerConfig,
    PhaseConfig,
    PlacementConfig,
    PromptLearningConfig,
    SpeedConfig,
    TrainingConfig,
    TrainValidationConfig,
)
from lmforge.config.validation import ValidationConfig

__all__ = [
    "AdapterConfig",
    "CheckpointingConfig",
    "CurationConfig",
    "DataConfig",
    "EvaluationConfig",
    "FeedSource",
    "FetchConfig",
    "HFSource",
    "IA3Config",
    "InstructionConfig",
    "KVCacheConfig",
    "LocalSource",
    "LoggingConfig",
    "LoraConfig",
    "LossConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "PhaseConfig",
    "PipelineConfig",
    "PlacementConfig",
    "PlatformConfig",
    "PromptLearningConfig",
    "RegistryConfig",
    "RuntimeConfig",
    "S3Source",
    "SchedulerConfig",
    "Section",
    "ServerConfig",
    "ServingConfig",
    "SpeedConfig",
    "StdlibSource",
    "TokenizeConfig",
    "TrainValidationConfig",
    "TrainingConfig",
    "ValidationConfig",
    "WebSource",
    "config_hash",
    "load_config",
    "parse_config",
    "parse_section",
    "updated",
]
