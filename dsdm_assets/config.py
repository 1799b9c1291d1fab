"""Step configuration: the base every asset config derives from, and the check of a whole run
config before any step runs.

Dagster checks a run config's shape and types when a run is launched, but the value
constraints of a pythonic config (``gt=0``, finite floats) are checked only when the step
that takes it starts, which can be hours into a run. ``check_run_config`` applies every
step's constraints at once, so ``dsdm check-config`` (run by ``make demo``), the sensor and
the schedule reject a bad value before the first step.
"""

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import dagster as dg
from pydantic import ConfigDict, ValidationError


class StepConfig(dg.Config):
    """Base of every asset's config: NaN and infinity are refused for every float field (a
    ``lambda_relative`` or ``lr`` of ``.inf`` would otherwise run to a meaningless result)."""

    model_config = ConfigDict(allow_inf_nan=False)


def step_config_validators(
    assets: Iterable[dg.AssetsDefinition],
) -> dict[str, Callable[[Mapping[str, Any]], object]]:
    """Op name -> a function that validates its ``config:`` section (raising pydantic's
    ValidationError): the config class of an op-backed asset, the config mapping of a
    graph-backed one."""
    validators: dict[str, Callable[[Mapping[str, Any]], object]] = {}
    for asset in assets:
        node = asset.node_def
        if isinstance(node, dg.GraphDefinition) and node.config_mapping is not None:
            validators[node.name] = node.config_mapping.resolve_from_unvalidated_config
        elif isinstance(node, dg.OpDefinition):
            parameter = inspect.signature(node.compute_fn.decorated_fn).parameters.get("config")
            annotation = parameter.annotation if parameter is not None else None
            if isinstance(annotation, type) and issubclass(annotation, dg.Config):
                validators[node.name] = annotation.model_validate
    return validators


def run_config_problems(run_config: Mapping[str, Any],
                        validators: Mapping[str, Callable[[Mapping[str, Any]], object]]) -> list[str]:
    """Every value of ``ops.<op>.config`` its step refuses, as
    ``ops.<op>.config.<field>: <reason> (got <value>)``; ops without a validator are left to
    Dagster's own check."""
    problems = []
    for op, section in (run_config.get("ops") or {}).items():
        if op not in validators or not isinstance(section, Mapping):
            continue
        try:
            validators[op](dict(section.get("config") or {}))
        except ValidationError as error:
            for item in error.errors():
                where = ".".join(str(part) for part in item["loc"])
                problems.append(f"ops.{op}.config.{where}: {item['msg']} (got {item['input']!r})")
    return problems


def check_run_config(run_config: Mapping[str, Any], source: str,
                     job: dg.JobDefinition | None = None) -> None:
    """Raise ValueError naming ``source`` and every refused value. With ``job``, Dagster's
    own check (unknown keys, wrong types) runs first."""
    from dsdm_assets.definitions import ASSETS  # the code location imports this module

    problems = run_config_problems(run_config, step_config_validators(ASSETS))
    if problems:
        listed = "\n  ".join(problems)
        raise ValueError(f"{source}: {len(problems)} invalid run-config value(s):\n  {listed}")
    if job is not None:
        try:
            dg.validate_run_config(job, dict(run_config))
        except dg.DagsterInvalidConfigError as error:
            raise ValueError(f"{source}: not a valid run config for {job.name}: {error}") from error
