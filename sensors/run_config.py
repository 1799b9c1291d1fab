"""The run config that sensor- and schedule-launched runs use: a YAML file named by
``DSDM_RUN_CONFIG`` (same format as ``dagster job execute -c``), read at every tick so an
edited file takes effect without reloading the code location. Every value is checked against
its step's constraints at the tick (`dsdm_assets.config.check_run_config`), so a bad value
fails the tick, naming the file and the field, instead of a step hours into the run."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

RUN_CONFIG_VARIABLE = "DSDM_RUN_CONFIG"


def run_config_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The parsed file, or ``{}`` (every default: the demo settings) when the variable is unset."""
    path = environ.get(RUN_CONFIG_VARIABLE)
    if not path:
        return {}
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise ValueError(f"{RUN_CONFIG_VARIABLE}={path}: cannot read the run config: {error}") from error
    except yaml.YAMLError as error:
        raise ValueError(f"{RUN_CONFIG_VARIABLE}={path}: not valid YAML: {error}") from error
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{RUN_CONFIG_VARIABLE}={path}: expected a mapping with ops/execution "
                         f"keys, got {type(loaded).__name__}")
    from dsdm_assets.config import check_run_config  # the code location imports this module

    check_run_config(loaded, f"{RUN_CONFIG_VARIABLE}={path}")
    return loaded
