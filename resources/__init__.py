"""Dagster resources: compute device, artifact store, crawl source, lineage database.

One code location serves a laptop (the defaults) and a cluster (``DSDM_STORE=s3://...``):
`env_resources()` binds every field whose ``DSDM_*`` variable is set to it with
``dg.EnvVar``, so Dagster resolves the value when a run or a step's process starts (a pod
or Ray worker with its own environment gets its own value) and shows the variable's name,
never its value, in the UI. `default_resources()` is the same set resolved now, for the
``dsdm`` commands that read the lineage database or the store outside a run.
"""

import os

import dagster as dg

from resources.compute import ComputeResource
from resources.lineage import LineageResource
from resources.storage import ArtifactStoreResource, CrawlSourceResource

__all__ = [
    "ArtifactStoreResource", "ComputeResource", "CrawlSourceResource", "LineageResource",
    "default_resources", "env_resources",
]


def _variable(name: str, default: object) -> object:
    """``dg.EnvVar(name)`` when the variable is set (resolved by Dagster at run time), else
    ``default``."""
    return dg.EnvVar(name) if os.environ.get(name) else default


def _int_variable(name: str, default: int) -> object:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        int(value)
    except ValueError as error:  # fail when the code location loads, naming the variable
        raise ValueError(f"{name}={value!r}: expected a whole number") from error
    return dg.EnvVar.int(name)


def env_resources() -> dict[str, dg.ConfigurableResource]:
    """The resources of the code location, each field bound to its ``DSDM_*`` variable when
    that is set (README.md, "Configuration", lists them and their defaults)."""
    endpoint = _variable("DSDM_S3_ENDPOINT", None)
    return {
        "store": ArtifactStoreResource(root_url=_variable("DSDM_STORE", ".dsdm/store"),
                                       endpoint_url=endpoint),
        "crawls": CrawlSourceResource(root_url=_variable("DSDM_CRAWL_ROOT", "data/crawls"),
                                      tasks_url=_variable("DSDM_TASKS", "data/tasks"),
                                      endpoint_url=endpoint),
        "lineage": LineageResource(database=_variable("DSDM_LINEAGE_DB", ".dsdm/lineage.duckdb")),
        "compute": ComputeResource(device=_variable("DSDM_DEVICE", "auto"),
                                   threads=_int_variable("DSDM_THREADS", 0)),
    }


def default_resources() -> dict[str, dg.ConfigurableResource]:
    """`env_resources()` with every variable resolved now."""
    return {key: resource.process_config_and_initialize()
            for key, resource in env_resources().items()}
