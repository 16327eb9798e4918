"""Configuration: one typed schema for every entrypoint, presets, and dotted overrides."""

from hericap.config.loader import ConfigError, list_presets, load_config, to_dict
from hericap.config.schema import (
    Config,
    DatasetConfig,
    DecodeConfig,
    EvaluationConfig,
    ExpConfig,
    ModelConfig,
    OptimizerConfig,
)

__all__ = [
    "Config",
    "ConfigError",
    "DatasetConfig",
    "DecodeConfig",
    "EvaluationConfig",
    "ExpConfig",
    "ModelConfig",
    "OptimizerConfig",
    "list_presets",
    "load_config",
    "to_dict",
]
