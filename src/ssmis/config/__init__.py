"""Run configuration: pydantic models (schema) and YAML loading with --set overrides (load)."""

from ssmis.config.load import load_config, dump_config
from ssmis.config.schema import RunConfig

__all__ = ["RunConfig", "load_config", "dump_config"]
