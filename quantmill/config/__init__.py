"""The typed config: schemas (``quantmill.config.schema``) and composition (``quantmill.config.compose``)."""

from quantmill.config.compose import (
    absolute_paths,
    compose,
    find_conf_dir,
    known_options,
    override_keys,
    to_config,
    to_dict,
)
from quantmill.config.schema import (
    DEFAULT_PROBES,
    GROUP_SCHEMAS,
    SCHEMA_NAME,
    CalibrationConfig,
    ConvertConfig,
    GateConfig,
    InfraConfig,
    ModelConfig,
    PoolConfig,
    PublishConfig,
    QuantmillConfig,
    RecipeConfig,
    RequiresConfig,
    SensitivityConfig,
    StoreConfig,
    TargetConfig,
    ValidateConfig,
    register_schemas,
)

__all__ = [
    "DEFAULT_PROBES", "GROUP_SCHEMAS", "SCHEMA_NAME", "CalibrationConfig", "ConvertConfig", "GateConfig",
    "InfraConfig", "ModelConfig", "PoolConfig", "PublishConfig", "QuantmillConfig", "RecipeConfig", "RequiresConfig",
    "SensitivityConfig", "StoreConfig", "TargetConfig", "ValidateConfig", "absolute_paths", "compose", "find_conf_dir", "known_options",
    "override_keys", "register_schemas", "to_config", "to_dict",
]
