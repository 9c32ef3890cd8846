"""Typed configs, one file per concern, and their YAML loading."""

from pixfleet.config.generation import (
    ControlPreprocessConfig,
    EvaluateConfig,
    GenerationJobConfig,
    GenerationParams,
    PreprocessConfig,
    ResourcesConfig,
    SinkConfig,
    SourceConfig,
)
from pixfleet.config.loading import ConfigError, load_config, validate_config
from pixfleet.config.model import (
    FreeUConfig,
    LoraConfig,
    ModelSpec,
    OptimizationConfig,
    TextualInversionConfig,
)
from pixfleet.config.tracking import TrackingConfig

__all__ = [
    "ConfigError",
    "ControlPreprocessConfig",
    "EvaluateConfig",
    "FreeUConfig",
    "GenerationJobConfig",
    "GenerationParams",
    "LoraConfig",
    "ModelSpec",
    "OptimizationConfig",
    "PreprocessConfig",
    "ResourcesConfig",
    "SinkConfig",
    "SourceConfig",
    "TextualInversionConfig",
    "TrackingConfig",
    "load_config",
    "validate_config",
]
