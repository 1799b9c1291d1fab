"""Evaluation and LDS assets on the small real crawl with tiny models: every method is
evaluated, results land in DuckDB and the report, and the baselines keep the contract."""

import copy
import json
import math
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from dsdm.artifacts import load_lds_losses
from dsdm.datamodels import proxy_subsets
from dsdm.evaluation import linear_datamodeling_score
from dsdm.store import ArtifactStore
from dsdm.trak import SOFT_THRESHOLD
from dsdm_assets import evaluation, selection
from dsdm_assets.definitions import ASSETS
from dsdm_assets.partitions import crawl_partitions
from dsdm_assets.selection import SELECTION_ASSETS
from resources import ComputeResource

TINY_EVAL = {"model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "batch_size": 16},
             "seeds": [0], "random_multiples": [2.0]}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, small_crawl_root, demo_resources, fast_run_config):
    folder: Path = tmp_path_factory.mktemp("eval")
    resources = demo_resources(folder, crawl_root=small_crawl_root)
    # one torch thread: tiny models gain nothing from more on a shared machine
    resources["compute"] = ComputeResource(device="cpu", threads=1)
    config = copy.deepcopy(fast_run_config)
    config["ops"]["evaluations"] = {"config": TINY_EVAL}
    config["ops"]["datamodel_lds"] = {"config": {"num_models": 4}}
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(crawl_partitions.name, ["small"])
    assets = ASSETS
    result = dg.materialize(assets, partition_key="small", instance=instance,
                            resources=resources, run_config=config)
    assert result.success
    return folder, result, instance, resources, config, assets


def _meta(result, asset: str) -> dict:
    (event,) = result.asset_materializations_for_node(asset)
    return {k: v.value for k, v in event.metadata.items()}


def test_every_method_writes_the_selection_contract(evaluated) -> None:
    folder, result, *_ = evaluated
    con = duckdb.connect(str(folder / "lineage.duckdb"), read_only=True)
    counts = dict(con.execute("SELECT method, count(*) FROM selections GROUP BY 1").fetchall())
    dsdm = _meta(result, "selected_subset")["selected"]
    assert counts == dict.fromkeys(SELECTION_ASSETS, dsdm)
    for method, asset in SELECTION_ASSETS.items():
        meta = _meta(result, asset)
        assert meta["method"] == method
        shards = list((folder / "store" / asset / "small").glob("*/examples-*.parquet"))
        assert shards, asset
    checks = [e for e in result.get_asset_check_evaluations() if e.check_name == "size_matches_budget"]
    assert len(checks) == len(SELECTION_ASSETS) and all(c.passed for c in checks)


def test_evaluations_cover_every_method_and_task(evaluated) -> None:
    folder, result, *_ = evaluated
    con = duckdb.connect(str(folder / "lineage.duckdb"), read_only=True)
    losses = con.execute("SELECT method, task, value FROM evaluations WHERE metric = 'loss'").fetchall()
    methods = {m for m, _, _ in losses}
    tasks = {t for _, t, _ in losses}
    assert methods == {*SELECTION_ASSETS, "random@2x", "unigram"}
    assert tasks == {"wiki_qa", "lambada_cloze", "tech_faq", "heldout_text"}
    # the unigram reference: every task, plus the pool's entropy (below ln(vocab))
    unigram = dict(con.execute("SELECT task, value FROM evaluations WHERE method = 'unigram' "
                               "AND metric = 'loss'").fetchall())
    assert set(unigram) == tasks
    (entropy,) = con.execute("SELECT value FROM evaluations WHERE method = 'unigram' AND "
                             "metric = 'entropy' AND task = 'pool_entropy'").fetchone()
    assert 2 < entropy < math.log(1024)
    assert all(0 < v < 20 for _, _, v in losses)
    mults = con.execute("SELECT method, task, value FROM evaluations WHERE metric = 'multiplier'").fetchall()
    assert {m for m, _, _ in mults} == set(SELECTION_ASSETS) - {"random"}
    assert all(v > 0 for *_, v in mults)
    # random at 1x sits on its own curve: multiplier of random itself is not reported, and
    # each evaluated selection is linked to the selection it trained on
    linked = con.execute("SELECT count(DISTINCT selection_id) FROM evaluations "
                         "WHERE metric = 'loss' AND budget = 1.0").fetchone()[0]
    assert linked == len(SELECTION_ASSETS)
    meta = _meta(result, "evaluations")
    assert "| selection |" in meta["report"] and "x wiki_qa" in meta["report"]
    assert f"unigram entropy is {entropy:.3f}" in meta["report"]
    png = Path(meta["plot"].removeprefix("file://"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lds_is_recorded_per_task(evaluated) -> None:
    """LDS of the soft-thresholded estimate (the selection's scores) and of raw tau, per
    task; the stored LDS models' losses and the stored tau give the recorded values back."""
    folder, result, *_ = evaluated
    con = duckdb.connect(str(folder / "lineage.duckdb"), read_only=True)
    recorded = {metric: dict(con.execute("SELECT task, value FROM evaluations WHERE metric = ?",
                                         [metric]).fetchall()) for metric in ("lds", "lds_raw")}
    for values in recorded.values():
        assert set(values) == {"wiki_qa", "lambada_cloze", "tech_faq"}
        assert all(-1 <= v <= 1 for v in values.values())
    assert recorded["lds"] != recorded["lds_raw"]
    assert "| task | lds |" in _meta(result, "datamodel_lds")["lds"]

    def stored(asset: str) -> Path:
        return folder / "store" / _meta(result, asset)["dsdm/manifest"].rsplit("/", 1)[0]

    weights, lds = stored("datamodel_weights"), stored("datamodel_lds")
    tau = torch.cat([load_file(p)["tau"] for p in sorted(weights.glob("tau-*.safetensors"))]).numpy()
    columns = pl.read_parquet(weights / "target_columns.parquet")
    measured = load_lds_losses(ArtifactStore(str(folder / "store")),
                               f"{lds.relative_to(folder / 'store')}/lds_losses.parquet",
                               columns["example_id"].to_list())
    assert measured.shape == (4, len(columns))
    summary = json.loads((lds / "manifest.json").read_text())["summary"]
    subsets = proxy_subsets(tau.shape[0], 4, summary["fraction"], seed=1000)
    for metric, threshold in (("lds", summary["soft_threshold"]), ("lds_raw", 0.0)):
        again = linear_datamodeling_score(tau, subsets, measured, columns["task"].to_list(),
                                          threshold_sd=threshold)
        assert dict(zip(again["task"], again["lds"], strict=True)) == pytest.approx(recorded[metric])
    assert summary["soft_threshold"] == SOFT_THRESHOLD


def test_evaluation_config_rejects_bad_input() -> None:
    from dsdm_assets.evaluation import EvaluationConfig

    with pytest.raises(ValueError, match="unknown methods"):
        EvaluationConfig(methods=["random", "oracle"])
    with pytest.raises(ValueError, match="must include 'random'"):
        EvaluationConfig(methods=["dsdm"])
    with pytest.raises(ValueError, match="each > 1"):
        EvaluationConfig(random_multiples=[0.5])


def test_unchanged_selections_are_reused_without_rescoring(evaluated, monkeypatch) -> None:
    """A re-run with the same inputs reads every method's scores back instead of recomputing
    them: the embedding and n-gram code is not even called."""
    _, _, instance, resources, config, assets = evaluated

    def not_called(*args, **kwargs):
        raise AssertionError("a reused selection recomputed its scores")

    for name in ("pool_embeddings", "minilm_embeddings", "_pool_texts"):
        monkeypatch.setattr(selection, name, not_called)
    again = dg.materialize(assets, selection=list(SELECTION_ASSETS.values()), partition_key="small", instance=instance, resources=resources,
                           run_config={"ops": {k: v for k, v in config["ops"].items()
                                               if k in SELECTION_ASSETS.values()}})
    assert again.success
    for asset in SELECTION_ASSETS.values():
        assert _meta(again, asset)["reused"] is True, asset


def _trained_models(monkeypatch) -> list[tuple]:
    """(model config, examples) of every model the evaluation assets train from now on."""
    trained: list[tuple] = []
    original = evaluation.train_evaluation_model

    def recording(model_config, examples, **kwargs):
        trained.append((model_config, examples))
        return original(model_config, examples, **kwargs)

    monkeypatch.setattr(evaluation, "train_evaluation_model", recording)
    return trained


def test_a_new_estimator_retrains_only_dsdm_models(evaluated, monkeypatch) -> None:
    """Changing only DsDm's estimator (lambda) re-trains DsDm's evaluation models; the
    baselines', the random curve's and every LDS model's results are adopted by key."""
    folder, first, instance, resources, config, assets = evaluated
    trained = _trained_models(monkeypatch)
    changed = copy.deepcopy(config)
    changed["ops"]["datamodel_weights"] = {"config": {"lambda_relative": 0.5}}
    names = {"datamodel_weights", "selected_subset", "evaluations", "datamodel_lds"}
    again = dg.materialize(assets, selection=list(names), partition_key="small", instance=instance, resources=resources,
                           run_config={"ops": {k: v for k, v in changed["ops"].items() if k in names}})
    assert again.success
    before, after = _meta(first, "selected_subset"), _meta(again, "selected_subset")
    assert before["config_hash"] != after["config_hash"]
    con = duckdb.connect(str(folder / "lineage.duckdb"), read_only=True)
    runs = con.execute(
        "SELECT asset, count(*) FILTER (WHERE NOT reused AND NOT coalesce(CAST(json_extract(extra, "
        "'$.adopted') AS BOOLEAN), false)) AS made, count(*) FROM artifacts WHERE run_id = ? AND "
        "json_extract_string(extra, '$.kind') = 'run' GROUP BY 1", [again.run_id]).fetchall()
    made = {asset: (n_made, n) for asset, n_made, n in runs}
    # one seed: DsDm's new selection is the only model trained; LDS re-uses all four
    assert [examples.num_rows for _, examples in trained] == [after["selected"]]
    assert made["evaluations"] == (1, len(SELECTION_ASSETS) + 1)
    assert made["datamodel_lds"] == (0, 4)


def test_more_seeds_per_subset_train_only_the_new_models(evaluated, monkeypatch) -> None:
    """``seeds_per_subset: 2`` adopts the one-seed run's four models, trains one more per
    subset with a new seed, and correlates with the two models' mean loss; the LDS against the
    first models alone is the one-seed run's."""
    folder, first, instance, resources, config, assets = evaluated
    trained = _trained_models(monkeypatch)
    names = ["datamodel_weights", "datamodel_lds"]
    ops = {k: v for k, v in copy.deepcopy(config)["ops"].items() if k in names}
    ops["datamodel_lds"]["config"]["seeds_per_subset"] = 2
    again = dg.materialize(assets, selection=names, partition_key="small", instance=instance,
                           resources=resources, run_config={"ops": ops})
    assert again.success
    assert [model.seed for model, _ in trained] == [1000 + k + evaluation.REPLICATE_SEED_STRIDE
                                                    for k in range(4)]

    con = duckdb.connect(str(folder / "lineage.duckdb"), read_only=True)
    lds_id = _meta(again, "datamodel_lds")["config_hash"]
    before = dict(con.execute("SELECT task, value FROM evaluations WHERE metric = 'lds' AND "
                              "evaluation_id = ?", [_meta(first, "datamodel_lds")["config_hash"]]).fetchall())
    now = {metric: dict(con.execute("SELECT task, value FROM evaluations WHERE metric = ? AND "
                                    "evaluation_id = ?", [metric, lds_id]).fetchall())
           for metric in ("lds", "lds_one_seed", "lds_noise_ceiling")}
    assert now["lds_one_seed"] == pytest.approx(before)
    assert now["lds"] != pytest.approx(before)
    assert set(now["lds_noise_ceiling"]) == set(before)
    assert all(0 <= v <= 1 for v in now["lds_noise_ceiling"].values())

    store = ArtifactStore(str(folder / "store"))
    path = _meta(again, "datamodel_lds")["dsdm/manifest"].rsplit("/", 1)[0] + "/lds_losses.parquet"
    rows = pl.read_parquet(folder / "store" / path)
    ids = rows["example_id"].unique(maintain_order=True).to_list()
    both = load_lds_losses(store, path, ids)
    one = load_lds_losses(store, path, ids, replicates=1)
    second = rows.filter(pl.col("replicate") == 1).pivot("example_id", index="model", values="loss")
    assert both == pytest.approx((one + second.select(ids).to_numpy()) / 2)
    with pytest.raises(ValueError, match="holds 2 models per subset, asked for 3"):
        load_lds_losses(store, path, ids, replicates=3)
