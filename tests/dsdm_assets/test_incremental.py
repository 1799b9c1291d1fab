"""Adding a target task reuses every candidate gradient shard: only the target features and
the scores are recomputed, the lineage says what was reused, and scores of the tasks that
were already there do not change. Target features that no longer match the candidates' are
refused with the reason."""

import copy

import dagster as dg
import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from dsdm.trak import SOFT_THRESHOLD
from dsdm_assets.definitions import defs
from dsdm_assets.partitions import crawl_partitions

ASSETS = ["documents", "tokenizer", "tokenized_corpus", "target_tasks", "proxy_checkpoints",
          "gradient_shards", "target_gradients", "datamodel_weights"]


def _with_tasks(config: dict, tasks: list[str]) -> dict:
    config = copy.deepcopy(config)
    config["ops"]["target_tasks"] = {"config": {"tasks": tasks}}
    return config


def _materialise(keys: list[str], run_config: dict, resources: dict, instance, **kwargs):
    return dg.materialize(list(defs.assets), selection=keys, partition_key="small",
                          instance=instance, resources=resources,
                          run_config={"ops": {k: v for k, v in run_config["ops"].items() if k in keys}},
                          **kwargs)


def _meta(result, asset: str) -> dict:
    (event,) = [e for e in result.get_asset_materialization_events()
                if e.asset_key.to_user_string() == asset]
    return {k: v.value for k, v in event.materialization.metadata.items()}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, small_crawl_root, demo_resources, fast_run_config):
    folder = tmp_path_factory.mktemp("incremental")
    resources = demo_resources(folder, crawl_root=small_crawl_root)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(crawl_partitions.name, ["small"])
    first = _materialise(ASSETS, _with_tasks(fast_run_config, ["wiki_qa"]), resources, instance)
    second = _materialise(ASSETS, _with_tasks(fast_run_config, ["wiki_qa", "tech_faq"]),
                          resources, instance)
    return folder, resources, instance, first, second


@pytest.mark.slow
def test_new_task_reuses_every_candidate_shard(two_runs) -> None:
    *_, first, second = two_runs
    before, after = _meta(first, "gradient_shards"), _meta(second, "gradient_shards")
    assert before["reused"] is False and before["files_computed"] == before["proxies"] * before["shards"]
    assert after["reused"] is True and after["files_computed"] == 0
    assert after["files_reused"] == before["files_computed"] > 0
    assert after["dsdm/manifest"] == before["dsdm/manifest"]
    assert _meta(second, "proxy_checkpoints")["reused"] is True
    targets = _meta(second, "target_gradients")
    assert targets["reused"] is False and targets["files_computed"] == before["proxies"]
    assert _meta(second, "datamodel_weights")["reused"] is False


@pytest.mark.slow
def test_lineage_records_the_reuse(two_runs) -> None:
    folder, *_, first, second = two_runs
    con = duckdb.connect(str(folder / "lineage.duckdb"), read_only=True)
    rows = {run: con.execute(
        "SELECT uri, sha256, reused FROM artifacts WHERE asset = 'gradient_shards' AND run_id = ? "
        "ORDER BY uri", [run]).fetchall() for run in (first.run_id, second.run_id)}
    assert rows[first.run_id] and {r[2] for r in rows[first.run_id]} == {False}
    assert {r[2] for r in rows[second.run_id]} == {True}
    assert [r[:2] for r in rows[second.run_id]] == [r[:2] for r in rows[first.run_id]]
    computed = con.execute("SELECT count(*) FROM artifacts WHERE asset = 'target_gradients' "
                           "AND run_id = ? AND NOT reused", [second.run_id]).fetchone()[0]
    assert computed > 0
    con.close()


@pytest.mark.slow
def test_scores_of_the_existing_task_do_not_change(two_runs) -> None:
    folder, *_, first, second = two_runs
    con = duckdb.connect(str(folder / "lineage.duckdb"), read_only=True)
    query = "SELECT example_id, score FROM scores WHERE run_id = ? AND task = ? ORDER BY example_id"
    old = con.execute(query, [first.run_id, "wiki_qa"]).fetchall()
    new = con.execute(query, [second.run_id, "wiki_qa"]).fetchall()
    added = con.execute(query, [second.run_id, "tech_faq"]).fetchall()
    con.close()
    assert [r[0] for r in old] == [r[0] for r in new] == [r[0] for r in added] and old
    np.testing.assert_allclose([r[1] for r in new], [r[1] for r in old], rtol=1e-5, atol=1e-9)


@pytest.mark.slow
def test_without_the_out_to_loss_weight_only_the_scores_change(two_runs, fast_run_config) -> None:
    """Leaving q out re-scores from the stored features (none is made again), and divides
    each candidate's scores on every task by one factor in (0, 1): its mean q over proxies."""
    folder, resources, instance, *_ = two_runs
    config = _with_tasks(fast_run_config, ["wiki_qa", "tech_faq"])
    runs = {}
    for weighted in (True, False):  # raw task means: q scales a candidate's row of tau,
        # and a per-target threshold would not keep that factor
        config["ops"]["datamodel_weights"] = {"config": {"out_to_loss_weight": weighted,
                                                         "soft_threshold": 0.0}}
        runs[weighted] = _materialise(ASSETS, config, resources, instance)
        assert _meta(runs[weighted], "gradient_shards")["files_computed"] == 0
        assert _meta(runs[weighted], "target_gradients")["reused"] is True
    con = duckdb.connect(str(folder / "lineage.duckdb"), read_only=True)
    query = ("SELECT task, example_id, score FROM scores WHERE scores_id = ? "
             "ORDER BY task, example_id")
    with_q, without = (np.array([r[2] for r in con.execute(
        query, [_meta(runs[w], "datamodel_weights")["scores_id"]]).fetchall()]).reshape(2, -1)
        for w in (True, False))
    con.close()
    # per candidate, the least-squares factor over its two task scores
    factor = (with_q * without).sum(0) / (without**2).sum(0)
    assert ((factor > 0) & (factor < 1)).all()
    np.testing.assert_allclose(with_q, without * factor, rtol=1e-6, atol=1e-12)
    assert factor.std() > 0  # q differs between candidates: the ranking can change


@pytest.mark.slow
def test_soft_threshold_changes_only_the_task_means(two_runs, fast_run_config) -> None:
    """The raw scores (threshold 0) come from the stored features; tau is the same estimate
    either way, and with the default threshold s each task score is the mean over its
    targets of tau soft-thresholded per target at s sd over the whole pool (checked densely
    against the stored tau). The explicit default reuses the default's scores."""
    folder, resources, instance, *_ = two_runs
    config = _with_tasks(fast_run_config, ["wiki_qa", "tech_faq"])
    runs = {}
    for threshold in (SOFT_THRESHOLD, 0.0):
        config["ops"]["datamodel_weights"] = {"config": {"soft_threshold": threshold}}
        runs[threshold] = _materialise(ASSETS, config, resources, instance)
        assert _meta(runs[threshold], "gradient_shards")["files_computed"] == 0
    assert _meta(runs[SOFT_THRESHOLD], "datamodel_weights")["reused"] is True
    folders = {t: folder / "store" / _meta(r, "datamodel_weights")["dsdm/manifest"].rsplit("/", 1)[0]
               for t, r in runs.items()}
    tau = {t: torch.cat([load_file(p)["tau"] for p in sorted(f.glob("tau-*.safetensors"))]).double()
           for t, f in folders.items()}
    torch.testing.assert_close(tau[SOFT_THRESHOLD], tau[0.0])
    tasks = np.array(pq.read_table(folders[0.0] / "target_columns.parquet")["task"].to_pylist())
    thresholded = pq.read_table(folders[SOFT_THRESHOLD] / "scores.parquet")
    raw = pq.read_table(folders[0.0] / "scores.parquet")
    t = tau[0.0]
    sparse = torch.sign(t) * torch.clamp(t.abs() - SOFT_THRESHOLD * t.std(0), min=0)
    assert 0.3 < float((sparse == 0).double().mean()) < 1  # most effects are within 1 sd
    for task in ("wiki_qa", "tech_faq"):
        np.testing.assert_allclose(thresholded[task].to_numpy(),
                                   sparse[:, tasks == task].mean(1).numpy(), rtol=1e-9, atol=1e-15)
        assert not np.allclose(thresholded[task].to_numpy(), raw[task].to_numpy())


@pytest.mark.slow
def test_stale_target_features_are_refused_then_follow_the_new_projection(
    two_runs, fast_run_config
) -> None:
    """The projection is configured on gradient_shards only. Re-featurising the candidates
    with another one leaves the target features stale: datamodel_weights refuses them, naming
    the setting; materialised again, target_gradients takes the new projection."""
    _, resources, instance, *_ = two_runs
    config = _with_tasks(fast_run_config, ["wiki_qa", "tech_faq"])
    config["ops"]["gradient_shards"] = {"config": {"target_dim": 128, "batch_size": 32}}
    result = _materialise(["gradient_shards", "datamodel_weights"], config, resources, instance,
                          raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.error.message
    assert "different settings (target_dim: 128 vs 256)" in message
    assert "materialise target_gradients again" in message
    again = _materialise(["target_gradients", "datamodel_weights"], config, resources, instance)
    assert _meta(again, "target_gradients")["dim"] == 128
