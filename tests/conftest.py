"""Shared fixtures: the committed demo crawl and Dagster resources pointed at temp folders."""

import gzip
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_CRAWL = REPO / "data" / "crawls" / "demo"
DEMO_TASKS = REPO / "data" / "tasks"


@pytest.fixture(scope="session")
def demo_rows() -> list[dict]:
    """Every row of the committed demo crawl, as written by scripts/build_corpus.py."""
    rows = []
    for path in sorted(DEMO_CRAWL.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            rows.extend(json.loads(line) for line in handle)
    assert rows, f"demo crawl missing under {DEMO_CRAWL}"
    return rows


@pytest.fixture(scope="session")
def demo_resources():
    """Build Dagster resources reading the demo crawl, writing store and DuckDB under a folder."""
    from resources import (
        ArtifactStoreResource,
        ComputeResource,
        CrawlSourceResource,
        LineageResource,
    )

    def build(folder: Path, crawl_root: Path = DEMO_CRAWL.parent, tasks: Path = DEMO_TASKS) -> dict:
        return {
            "store": ArtifactStoreResource(root_url=str(folder / "store")),
            "crawls": CrawlSourceResource(root_url=str(crawl_root), tasks_url=str(tasks)),
            "lineage": LineageResource(database=str(folder / "lineage.duckdb")),
            "compute": ComputeResource(device="cpu"),
        }

    return build
