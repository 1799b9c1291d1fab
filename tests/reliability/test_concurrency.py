"""Two runs of one new partition at once, sharing a store and a lineage file: the second waits
for each asset folder the first is computing and reuses it, so no work is done twice and
every lineage row's sha256 still matches the stored file."""

import hashlib
import multiprocessing
from pathlib import Path

import duckdb


def _materialise(folder: str, crawl_root: str, tasks: str, run_config: dict, done) -> None:
    import dagster as dg

    from dsdm_assets.datamodels import proxy_checkpoints
    from dsdm_assets.ingest import documents, target_tasks, tokenized_corpus, tokenizer
    from dsdm_assets.partitions import crawl_partitions
    from resources import (
        ArtifactStoreResource,
        ComputeResource,
        CrawlSourceResource,
        LineageResource,
    )

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(crawl_partitions.name, ["small"])
    result = dg.materialize(
        [documents, tokenizer, tokenized_corpus, target_tasks, proxy_checkpoints],
        partition_key="small", instance=instance, run_config=run_config,
        resources={"store": ArtifactStoreResource(root_url=f"{folder}/store"),
                   "crawls": CrawlSourceResource(root_url=crawl_root, tasks_url=tasks),
                   "lineage": LineageResource(database=f"{folder}/lineage.duckdb"),
                   "compute": ComputeResource(device="cpu", threads=1)})
    reused = {}
    for event in result.get_asset_materialization_events():
        materialisation = event.step_materialization_data.materialization
        reused[materialisation.asset_key.to_user_string()] = materialisation.metadata["reused"].value
    done.put(reused)


def test_two_runs_of_one_partition_share_the_work(tmp_path: Path, small_crawl_root: Path,
                                                  fast_run_config: dict) -> None:
    tasks = str(Path(__file__).resolve().parents[2] / "data" / "tasks")
    ops = {k: v for k, v in fast_run_config["ops"].items()
           if k in ("tokenizer", "tokenized_corpus", "proxy_checkpoints")}
    context = multiprocessing.get_context("spawn")
    done = context.Queue()
    runs = [context.Process(target=_materialise, args=(str(tmp_path), str(small_crawl_root), tasks,
                                                       {"ops": ops}, done)) for _ in range(2)]
    for run in runs:
        run.start()
    outcomes = [done.get(timeout=600) for _ in runs]
    for run in runs:
        run.join(60)
        assert run.exitcode == 0
    # each asset computed by exactly one run and reused by the other
    assert set(outcomes[0]) == set(outcomes[1]) and len(outcomes[0]) == 5
    for asset in outcomes[0]:
        assert sorted([outcomes[0][asset], outcomes[1][asset]]) == [False, True], asset
    rows = duckdb.connect(str(tmp_path / "lineage.duckdb"), read_only=True).sql(
        "SELECT uri, sha256 FROM artifacts").fetchall()
    assert len(rows) > 20
    for uri, sha in rows:
        data = Path(uri.removeprefix("file://")).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha, uri
