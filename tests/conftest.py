"""Shared fixtures: the committed demo crawl and Dagster resources pointed at temp folders."""

import gzip
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

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
        "target_gradients": {"config": {"batch_size": 32}},
        # source quotas have their own test (test_selection_pipeline): the rest selects by
        # DsDm's ranking of the whole pool
        "mixture_runs": {"config": {"runs": 0}},
    }
}


@dataclass
class Cli:
    """The installed commands (``dagster``, ``dsdm``) run as a user runs them, with a
    temporary DAGSTER_HOME, store and DuckDB file under ``folder`` and the small crawl."""

    folder: Path
    env: dict[str, str]
    run_config: Path
    outputs: dict[str, subprocess.CompletedProcess] = field(default_factory=dict)

    @property
    def lineage_db(self) -> Path:
        return self.folder / "lineage.duckdb"

    def command(self, program: str, *args: str) -> list[str]:
        return [str(Path(sys.executable).parent / program), *args]

    def job(self, crawl: str = "small", job: str = "selection_job") -> list[str]:
        return self.command("dagster", "job", "execute", "-m", "dsdm_assets.definitions",
                            "-j", job, "-c", str(self.run_config),
                            "--tags", json.dumps({"dagster/partition": crawl}))

    def run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(args, env=self.env, cwd=REPO, capture_output=True, text=True,
                                timeout=900)
        if check:
            assert result.returncode == 0, (
                f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result


@pytest.fixture(scope="session")
def make_cli(small_crawl_root: Path, fast_run_config: dict):
    """Build a `Cli` in a folder: the fast run config (in-process executor) as a YAML file."""

    def build(folder: Path) -> Cli:
        home = folder / "dagster_home"
        home.mkdir(parents=True)
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        config = folder / "run.yaml"
        config.write_text(yaml.safe_dump({"execution": {"config": {"in_process": {}}},
                                          **fast_run_config}))
        env = {**os.environ, "DAGSTER_HOME": str(home), "DSDM_CRAWL_ROOT": str(small_crawl_root),
               "DSDM_TASKS": str(DEMO_TASKS), "DSDM_STORE": str(folder / "store"),
               "DSDM_LINEAGE_DB": str(folder / "lineage.duckdb"), "DSDM_DEVICE": "cpu"}
        for variable in ("DSDM_S3_ENDPOINT", "DSDM_EXECUTOR", "DSDM_K8S_GPUS_PER_STEP"):
            env.pop(variable, None)
        return Cli(folder, env, config)

    return build


@pytest.fixture(scope="session")
def cli_selection_run(tmp_path_factory, make_cli) -> Cli:
    """What CI does: validate the code location, register the crawl, `dagster job execute`
    the selection job on it. Uninterrupted: other tests compare against its artifacts."""
    cli = make_cli(tmp_path_factory.mktemp("cli"))
    cli.outputs["validate"] = cli.run(cli.command("dagster", "definitions", "validate",
                                                  "-m", "dsdm_assets.definitions"))
    cli.outputs["add-crawl"] = cli.run(cli.command("dsdm", "add-crawl", "small"))
    cli.outputs["job"] = cli.run(cli.job())
    return cli
