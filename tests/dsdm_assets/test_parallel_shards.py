"""Featurisation fans out over (proxy, shard) steps: run by the multiprocess executor, two at
a time in separate processes, it writes feature files byte-identical to the in-process run's,
and the datamodel weights downstream of them pass their checks.

Both runs use one torch thread (DSDM_THREADS): matmul reductions split by thread count, so
bit-for-bit equality holds only at an equal count, and an earlier test in this process may
have changed the default."""

import os
import shutil
from pathlib import Path

import dagster as dg
import pytest

from dsdm_assets.definitions import selection_job_from_env
from dsdm_assets.partitions import crawl_partitions

REPO = Path(__file__).resolve().parents[2]
UPSTREAM = ["documents", "tokenizer", "tokenized_corpus", "target_tasks", "proxy_checkpoints"]
FEATURISED = ["gradient_shards", "target_gradients"]


def _execute(instance, run_config: dict, assets: list[str], executor: dict):
    result = dg.execute_job(
        dg.reconstructable(selection_job_from_env), instance,
        run_config={**run_config, "execution": {"config": executor}},
        tags={"dagster/partition": "small"},
        asset_selection=[dg.AssetKey(a) for a in assets],
    )
    assert result.success
    return result


def _files(folder: Path) -> dict[str, bytes]:
    """Files of the one materialised folder below an asset's crawl folder, by name, except
    the manifest (it names its run). The folder's own name hashes the inputs' manifests, so
    it differs where an upstream asset was re-made by another run."""
    (made,) = [p for p in folder.iterdir() if p.is_dir()]
    return {str(p.relative_to(made)): p.read_bytes()
            for p in sorted(made.rglob("*")) if p.is_file() and p.name != "manifest.json"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_crawl_root, fast_run_config):
    folder = tmp_path_factory.mktemp("parallel")
    store = folder / "store"
    (folder / "home").mkdir()
    with pytest.MonkeyPatch.context() as env, dg.instance_for_test(temp_dir=str(folder / "home")) as instance:
        for key, value in {"DSDM_STORE": store, "DSDM_CRAWL_ROOT": small_crawl_root,
                           "DSDM_TASKS": REPO / "data" / "tasks",
                           "DSDM_LINEAGE_DB": folder / "lineage.duckdb", "DSDM_DEVICE": "cpu",
                           "DSDM_THREADS": 1}.items():
            env.setenv(key, str(value))
        env.delenv("DSDM_S3_ENDPOINT", raising=False)
        instance.add_dynamic_partitions(crawl_partitions.name, ["small"])
        in_process = _execute(instance, fast_run_config, UPSTREAM + FEATURISED, {"in_process": {}})
        reference = folder / "in_process"
        reference.mkdir()
        for asset in FEATURISED:  # set the in-process results aside; the store must recompute
            shutil.move(store / asset, reference / asset)
        # forkserver: step processes fork from one that imported the code location once
        parallel = _execute(instance, fast_run_config, [*FEATURISED, "datamodel_weights"], {"multiprocess": {
            "max_concurrent": 2, "start_method": {"forkserver": {}}}})
        yield store, reference, in_process, parallel, instance


def _meta(result, step: str) -> dict:
    (event,) = [e for e in result.get_asset_materialization_events() if e.step_key == step]
    return {k: v.value for k, v in event.materialization.metadata.items()}


@pytest.mark.slow
def test_multiprocess_features_are_byte_identical(runs) -> None:
    store, reference, *_ = runs
    for asset in FEATURISED:
        expected = _files(reference / asset / "small")
        got = _files(store / asset / "small")
        assert expected.keys() == got.keys(), asset
        assert [k for k in expected if expected[k] != got[k]] == [], asset
    shards = [k for k in _files(store / "gradient_shards" / "small") if "/shard-" in k]
    assert len(shards) >= 4 and any("proxy-01/" in k for k in shards)
    # Scores come from float64 solves whose reduction order follows the step process's thread
    # count, so only the features are compared bit for bit; the scores must exist.
    scores = [k for k in _files(store / "datamodel_weights" / "small") if k.endswith("scores.parquet")]
    assert len(scores) == 1


@pytest.mark.slow
def test_each_shard_was_its_own_step_in_its_own_process(runs) -> None:
    *_, parallel, instance = runs
    starts = [e for e in instance.all_logs(parallel.run_id, of_type=dg.DagsterEventType.STEP_START)
              if e.step_key.startswith("gradient_shards.featurise_gradient_shard[")]
    meta = _meta(parallel, "gradient_shards.collect_gradient_shards")
    assert len(starts) == meta["files_computed"] == meta["proxies"] * meta["shards"]
    assert meta["files_reused"] == 0 and meta["reused"] is False
    pids = {e.dagster_event.pid for e in starts}
    assert len(pids) > 1 and os.getpid() not in pids
    checks = {(c.asset_key.to_user_string(), c.check_name): c.passed
              for c in parallel.get_asset_check_evaluations()}
    assert checks == {("gradient_shards", "features_finite"): True,
                      ("target_gradients", "features_finite"): True,
                      ("datamodel_weights", "scores_finite"): True}
