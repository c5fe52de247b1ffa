"""Typed run configuration: YAML plus dotted ``key=value`` overrides, validated at load.

Every field is a dataclass attribute with a docstring-style comment; `load_config` parses, coerces and
validates in one pass so that a bad config fails before any cluster work, with one line per problem that
names the field and what is allowed (`ConfigError.messages`).

- `schema`: the dataclasses (`Config` and its sections), the allowed values, `compute_dtype`;
- `parsing`: YAML, overrides, path resolution, `load_config`;
- `validation`: `validate` and its per-section checks, `ConfigError`;
- `paths`: the filesystem predicates parsing and validation share.

Every name callers use is importable from `uft_ray.config` itself.
"""

from __future__ import annotations

from uft_ray.config.parsing import apply_override, load_config, resolve_config_paths
from uft_ray.config.paths import is_remote
from uft_ray.config.schema import (
    LOSS_KINDS,
    LOSS_TYPES,
    ROLLOUT_BACKENDS,
    Config,
    DataConfig,
    DeepSpeedConfig,
    EvalConfig,
    HintConfig,
    LoggingConfig,
    LoraConfig,
    LossConfig,
    MixtureConfig,
    ModelConfig,
    OutputConfig,
    RayConfig,
    ReferenceConfig,
    RftConfig,
    RolloutConfig,
    SourceConfig,
    TokenizeConfig,
    TrainConfig,
    compute_dtype,
    reference_revision,
)
from uft_ray.config.validation import ConfigError, validate

# Tables owned elsewhere, re-exported so that `from uft_ray.config import FORMATS` keeps working.
from uft_ray.data.formats import FORMAT_KINDS, FORMATS, HELPSTEER2_ATTRIBUTES
from uft_ray.tasks.names import FILE_TASKS, GENERATED_TASKS

__all__ = [
    "FILE_TASKS",
    "FORMATS",
    "FORMAT_KINDS",
    "GENERATED_TASKS",
    "HELPSTEER2_ATTRIBUTES",
    "LOSS_KINDS",
    "LOSS_TYPES",
    "ROLLOUT_BACKENDS",
    "Config",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "EvalConfig",
    "HintConfig",
    "LoggingConfig",
    "LoraConfig",
    "LossConfig",
    "MixtureConfig",
    "ModelConfig",
    "OutputConfig",
    "RayConfig",
    "ReferenceConfig",
    "RftConfig",
    "RolloutConfig",
    "SourceConfig",
    "TokenizeConfig",
    "TrainConfig",
    "apply_override",
    "compute_dtype",
    "reference_revision",
    "is_remote",
    "load_config",
    "resolve_config_paths",
    "validate",
]
