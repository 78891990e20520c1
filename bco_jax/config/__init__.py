"""The training configuration: one typed dataclass per concern, flattened into one namespace of keys.

    schema.py    the frozen sections (ModelOptions, LossOptions, ...) and TrainConfig, the key table
    parse.py     the one CLI + YAML parser (train, evaluate and plan read their keys through it)
    validate.py  the checks, the resolved config and what is derived from it (mesh shape, run name)

Which keys a resume may change is `bco_jax.resume`'s (OPERATIONAL_KEYS, resume_differences).
"""
from bco_jax.config.parse import add_keys, build_config, parse_args, parse_value, read_yaml
from bco_jax.config.schema import (
    KEY_ALIASES,
    SECTIONS,
    LaunchOptions,
    LossOptions,
    ModelOptions,
    OnlineOptions,
    OptimOptions,
    RunOptions,
    TrainConfig,
    field_type,
    key_table,
    separate_reference,
)
from bco_jax.config.validate import getattr_flat, mesh_shape, run_name, validate
from bco_jax.errors import ConfigError

__all__ = ["KEY_ALIASES", "SECTIONS", "ConfigError", "LaunchOptions", "LossOptions", "ModelOptions",
           "OnlineOptions", "OptimOptions", "RunOptions", "TrainConfig", "add_keys", "build_config", "field_type",
           "getattr_flat", "key_table", "mesh_shape", "parse_args", "parse_value", "read_yaml", "run_name",
           "separate_reference", "validate"]
