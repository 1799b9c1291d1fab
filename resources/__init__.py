"""Dagster resources: compute device, artifact store, crawl source, lineage database.

``default_resources()`` builds them from environment variables so one code location serves
a laptop (defaults) and a cluster (``DSDM_STORE=s3://...``) alike.
"""

import os

from resources.compute import ComputeResource
from resources.lineage import LineageResource
from resources.storage import ArtifactStoreResource, CrawlSourceResource

__all__ = [
    "ArtifactStoreResource", "ComputeResource", "CrawlSourceResource", "LineageResource",
    "default_resources",
]

ENVIRONMENT_VARIABLES = {
    "DSDM_STORE": "artifact store root URL (default .dsdm/store)",
    "DSDM_S3_ENDPOINT": "S3-compatible endpoint URL for store and crawls (optional)",
    "DSDM_CRAWL_ROOT": "folder/prefix with one sub-folder per crawl (default data/crawls)",
    "DSDM_TASKS": "folder/prefix with target task files (default data/tasks)",
    "DSDM_LINEAGE_DB": "DuckDB file (default .dsdm/lineage.duckdb)",
    "DSDM_DEVICE": "auto | cpu | cuda (default auto)",
    "DSDM_THREADS": "torch threads per step process; 0 keeps torch's default (default 0)",
}


def _int_variable(name: str, default: int) -> int:
    value = os.environ.get(name) or str(default)
    try:
        return int(value)
    except ValueError as error:
        raise ValueError(f"{name}={value!r}: expected a whole number") from error


def default_resources() -> dict[str, object]:
    env = os.environ.get
    endpoint = env("DSDM_S3_ENDPOINT") or None
    return {
        "store": ArtifactStoreResource(root_url=env("DSDM_STORE", ".dsdm/store"), endpoint_url=endpoint),
        "crawls": CrawlSourceResource(
            root_url=env("DSDM_CRAWL_ROOT", "data/crawls"),
            tasks_url=env("DSDM_TASKS", "data/tasks"),
            endpoint_url=endpoint,
        ),
        "lineage": LineageResource(database=env("DSDM_LINEAGE_DB", ".dsdm/lineage.duckdb")),
        "compute": ComputeResource(device=env("DSDM_DEVICE", "auto"),
                                   threads=_int_variable("DSDM_THREADS", 0)),
    }
