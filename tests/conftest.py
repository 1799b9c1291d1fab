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


@pytest.fixture(scope="session")
def small_crawl_root(tmp_path_factory, demo_rows: list[dict]) -> Path:
    """A crawl named ``small``: every 8th demo document (all domains, a fast pipeline run)."""
    root = tmp_path_factory.mktemp("crawls")
    (root / "small").mkdir()
    with gzip.open(root / "small" / "part-00000.jsonl.gz", "wt", encoding="utf-8") as handle:
        for row in demo_rows[::8]:
            handle.write(json.dumps(row) + "\n")
    (root / "small" / "_SUCCESS").write_text("")
    return root


@pytest.fixture(scope="session")
def fast_run_config() -> dict:
    """Tiny proxies and projections: the pipeline's logic, not its quality, is under test."""
    return FAST_RUN_CONFIG


FAST_RUN_CONFIG = {
    "ops": {
        "tokenizer": {"config": {"vocab_size": 1024}},
        "tokenized_corpus": {"config": {"shard_size": 256}},
        "proxy_checkpoints": {"config": {"num_proxies": 2, "model": {
            "hidden_size": 32, "num_layers": 1, "num_heads": 2, "epochs": 2, "batch_size": 16}}},
        "gradient_shards": {"config": {"target_dim": 256, "batch_size": 32}},
    }
}
