"""The whole job on a small real crawl: scores and selection land in DuckDB, checks pass,
runs are deterministic, and an interrupted featurisation resumes from its finished shards."""

import copy
import hashlib
import json
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest

from dsdm_assets.definitions import defs
from dsdm_assets.partitions import crawl_partitions

# the selection pipeline (evaluation has its own tests: tests/dsdm_assets/test_evaluation_assets.py)
ALL_ASSETS = [a for a in defs.assets if a.group_names_by_key[a.key] != "evaluation"]


def _run(folder: Path, resources: dict, run_config: dict, instance=None):
    instance = instance or dg.DagsterInstance.ephemeral()
    if "small" not in instance.get_dynamic_partitions(crawl_partitions.name):
        instance.add_dynamic_partitions(crawl_partitions.name, ["small"])
    result = dg.materialize(ALL_ASSETS, partition_key="small", instance=instance,
                            resources=resources, run_config=run_config)
    assert result.success
    return result, instance


def _meta(result, asset: str) -> dict:
    (event,) = result.asset_materializations_for_node(asset)
    return {k: v.value for k, v in event.metadata.items()}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, small_crawl_root, demo_resources, fast_run_config):
    folder = tmp_path_factory.mktemp("run1")
    resources = demo_resources(folder, crawl_root=small_crawl_root)
    result, instance = _run(folder, resources, fast_run_config)
    return folder, resources, result, instance, fast_run_config


def test_scores_and_selection_land_in_duckdb(first_run) -> None:
    folder, _, result, *_ = first_run
    con = duckdb.connect(str(folder / "lineage.duckdb"), read_only=True)
    examples = _meta(result, "tokenized_corpus")["examples"]
    per_task = dict(con.execute("SELECT task, count(*) FROM scores GROUP BY 1").fetchall())
    assert per_task == {"lambada_cloze": examples, "tech_faq": examples, "wiki_qa": examples}
    selected = con.execute("SELECT count(*), min(rank), max(rank), count(DISTINCT example_id) "
                       "FROM selections WHERE crawl = 'small' AND method = 'dsdm'").fetchone()
    assert selected == (examples // 5, 1, examples // 5, examples // 5)
    # the selection is the top of the mixed scores: its scores are non-increasing in rank
    ranked = [r[0] for r in con.execute(
        "SELECT score FROM selections WHERE method = 'dsdm' ORDER BY rank").fetchall()]
    assert ranked == sorted(ranked, reverse=True)
    # "why was this example selected": from the selection row back to the checkpoints
    lineage = con.execute("""
        SELECT DISTINCT p.asset FROM artifacts s
        JOIN artifact_inputs i1 ON i1.artifact_id = s.artifact_id
        JOIN artifacts w ON w.uri = i1.input_uri
        JOIN artifact_inputs i2 ON i2.artifact_id = w.artifact_id
        JOIN artifacts g ON g.uri = i2.input_uri
        JOIN artifact_inputs i3 ON i3.artifact_id = g.artifact_id
        JOIN artifacts p ON p.uri = i3.input_uri
        WHERE s.asset = 'selected_subset'""").fetchall()
    assert ("proxy_checkpoints",) in lineage


def test_asset_checks_ran_and_passed(first_run) -> None:
    _, _, result, *_ = first_run
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"loss_fell": True, "features_finite": True, "scores_finite": True,
                      "size_matches_budget": True, "source_mix": True,
                      "targets_not_in_pool": True}


def test_step_values_are_removed_once_the_features_are_collected(first_run) -> None:
    folder, _, result, instance, _ = first_run
    assert not (folder / "store" / "_steps" / result.run_id).exists()
    (logged,) = [e.user_message for e in instance.all_logs(result.run_id)
                 if "step values of this run" in e.user_message]
    assert logged.startswith("removed ") and not logged.startswith("removed 0 ")


def test_selection_metadata_shows_source_shares(first_run) -> None:
    _, _, result, *_ = first_run
    meta = _meta(result, "selected_subset")
    assert "| source | pool | selected |" in meta["source_shares"]
    shares = [v for k, v in meta.items() if k.startswith("share_")]
    assert abs(sum(shares) - 1.0) < 1e-9
    # the best and worst of the pool, each with the target it helps (hurts) most
    top, bottom = meta["top_examples_explained"], meta["bottom_examples_explained"]
    assert "| example_id | source | score | pool_rank | helps_most | target_id | tau |" in top
    assert "| 1 |" in top and "hurts_most" in bottom
    assert len(top.strip().splitlines()) == len(bottom.strip().splitlines()) == 7  # header + 5


def _manifest_sha(folder: Path, asset: str) -> str:
    (path,) = list((folder / "store" / asset / "small").glob("*/manifest.parquet"))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_config_gives_identical_scores_and_selection(
    first_run, tmp_path, small_crawl_root, demo_resources
) -> None:
    folder1, config = first_run[0], first_run[-1]
    resources = demo_resources(tmp_path, crawl_root=small_crawl_root)
    _run(tmp_path, resources, config)
    assert _manifest_sha(tmp_path, "selected_subset") == _manifest_sha(folder1, "selected_subset")
    (s1,) = list((folder1 / "store" / "datamodel_weights" / "small").glob("*/scores.parquet"))
    (s2,) = list((tmp_path / "store" / "datamodel_weights" / "small").glob("*/scores.parquet"))
    assert s1.read_bytes() == s2.read_bytes()


def test_interrupted_featurisation_resumes_from_finished_shards(first_run) -> None:
    folder, resources, result, instance, config = first_run
    grads = _meta(result, "gradient_shards")
    grad_folder = folder / "store" / grads["dsdm/manifest"].rsplit("/", 1)[0]
    files = sorted(grad_folder.glob("proxy-*/*.safetensors"))
    # Simulate a crash after some shards: no manifest, and the last proxy's files missing.
    (grad_folder / "manifest.json").unlink()
    lost = [f for f in files if f.parent.name == "proxy-01"]
    for f in lost:
        f.unlink()
    config = copy.deepcopy(config)
    rerun = dg.materialize(ALL_ASSETS, selection=["gradient_shards"], partition_key="small", instance=instance, resources=resources,
                           run_config={"ops": {"gradient_shards": config["ops"]["gradient_shards"]}})
    meta = _meta(rerun, "gradient_shards")
    assert meta["files_reused"] == len(files) - len(lost)
    assert meta["files_computed"] == len(lost)
    assert meta["config_hash"] == grads["config_hash"]


def test_a_changed_or_missing_stored_file_is_recomputed_not_trusted(first_run) -> None:
    folder, resources, result, instance, config = first_run
    grads = _meta(result, "gradient_shards")
    grad_folder = folder / "store" / grads["dsdm/manifest"].rsplit("/", 1)[0]
    flipped, deleted = grad_folder / "proxy-00" / "shard-00001.safetensors", \
        grad_folder / "proxy-01" / "shard-00000.safetensors"
    originals = {f: f.read_bytes() for f in (flipped, deleted)}
    damaged = bytearray(originals[flipped])
    damaged[-64] ^= 0b101  # two bits of one float: same size, other sha256
    flipped.write_bytes(bytes(damaged))
    deleted.unlink()

    # A reader of the damaged asset refuses it, naming both files.
    reader = dg.materialize(ALL_ASSETS, selection=["datamodel_weights"], partition_key="small",
                            instance=instance, resources=resources, raise_on_error=False)
    (failure,) = [e for e in reader.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.message
    assert "2 stored file(s) are not what its manifest recorded" in message
    assert "proxy-00/shard-00001.safetensors: sha256" in message
    assert "proxy-01/shard-00000.safetensors: missing" in message

    # Re-materialising it recomputes exactly those two files, byte for byte, and says so.
    rerun = dg.materialize(ALL_ASSETS, selection=["gradient_shards"], partition_key="small",
                           instance=instance, resources=resources,
                           run_config={"ops": {"gradient_shards": config["ops"]["gradient_shards"]}})
    meta = _meta(rerun, "gradient_shards")
    assert meta["reused"] is False and meta["files_reused"] == len(list(
        grad_folder.glob("proxy-*/*.safetensors"))) - 2
    assert all(f.read_bytes() == data for f, data in originals.items())
    warnings = [e.user_message for e in instance.all_logs(rerun.run_id)
                if "is not the file its manifest recorded" in e.user_message]
    assert len(warnings) == 2
    manifest = json.loads((grad_folder / "manifest.json").read_text())
    assert sorted(p.rsplit("/", 2)[-2] for p in manifest["replaced"]) == ["proxy-00", "proxy-01"]
    rows = duckdb.connect(str(folder / "lineage.duckdb"), read_only=True).sql(
        "SELECT uri, json_extract_string(extra, '$.replaced') AS why FROM artifacts "
        "WHERE run_id = $run AND why IS NOT NULL", params={"run": rerun.run_id}).fetchall()
    assert sorted(uri.rsplit("/", 2)[-2] for uri, _ in rows) == ["proxy-00", "proxy-01"]
    assert dg.materialize(ALL_ASSETS, selection=["datamodel_weights"], partition_key="small",
                          instance=instance, resources=resources).success


def test_document_selection_keeps_whole_documents_within_the_token_budget(first_run) -> None:
    """unit: document, for DsDm and two baselines, on the small demo crawl: only whole
    documents, tokens within 20% of the pool's, no left-out document that would still fit;
    the manifest, the shards and the selections table name the unit."""
    folder, resources, _, instance, _ = first_run
    methods = {"selected_subset": "dsdm", "random_subset": "random", "dsir_subset": "dsir"}
    result = dg.materialize(
        ALL_ASSETS, selection=list(methods), partition_key="small", instance=instance,
        resources=resources,
        run_config={"ops": {a: {"config": {"unit": "document"}} for a in methods}})
    assert result.success
    checks = {(e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()}
    con = duckdb.connect(str(folder / "lineage.duckdb"), read_only=True)
    corpus = pl.concat([pl.read_parquet(f, columns=["doc_id", "n_tokens"]) for f in sorted(
        (folder / "store" / "tokenized_corpus" / "small").glob("*/shard-*.parquet"))])
    doc_tokens = dict(corpus.group_by("doc_id").agg(pl.col("n_tokens") - 1).with_columns(
        pl.col("n_tokens").list.sum()).iter_rows())
    budget = int(0.2 * sum(doc_tokens.values()))
    kept_by = {}
    for asset, method in methods.items():
        meta = _meta(result, asset)
        kept = con.execute("SELECT DISTINCT doc_id FROM selections WHERE crawl = 'small' AND "
                           "selection_id = ? AND unit = 'document'", [meta["selection_id"]]).fetchall()
        kept_by[method] = kept = {d for (d,) in kept}
        rows = con.execute("SELECT count(*), count(DISTINCT unit) FROM selections "
                           "WHERE selection_id = ?", [meta["selection_id"]]).fetchone()
        assert rows == (corpus["doc_id"].is_in(list(kept)).sum(), 1), method  # whole documents
        used = sum(doc_tokens[d] for d in kept)
        assert used == meta["selected_tokens"] and used <= budget, method
        assert all(n > budget - used for d, n in doc_tokens.items() if d not in kept), method
        check = checks[(asset, "size_matches_budget")]
        assert check.passed and check.metadata["whole_documents"].value, method
        selection_folder = folder / "store" / meta["dsdm/manifest"].rsplit("/", 1)[0]
        assert set(pq.read_table(selection_folder / "manifest.parquet").column("unit").to_pylist()) == {"document"}
        shard = pq.read_schema(sorted(selection_folder.glob("examples-*.parquet"))[0])
        assert shard.metadata[b"dsdm.unit"] == b"document"
    example_level = {d for (d,) in con.execute(
        "SELECT DISTINCT doc_id FROM selections WHERE method = 'dsdm' AND unit = 'example'").fetchall()}
    assert example_level and example_level != kept_by["dsdm"]
    assert kept_by["dsdm"] != kept_by["random"]


def test_a_negative_weight_lowers_the_avoided_tasks_source(first_run) -> None:
    """The demo's task to avoid, held-out spam, at weight -1 next to two real targets: the
    selection keeps less spam than the positive-only mix, its mean spam_mail score is below
    the pool's, and the weight is recorded negative."""
    folder, resources, _, instance, config = first_run
    tasks = ["wiki_qa", "tech_faq", "spam_mail"]
    rescored = dg.materialize(
        ALL_ASSETS, selection=["target_tasks", "target_gradients", "datamodel_weights"],
        partition_key="small", instance=instance, resources=resources,
        run_config={"ops": {"target_tasks": {"config": {"tasks": tasks}},
                            "target_gradients": config["ops"]["target_gradients"]}})
    assert rescored.success
    shares, spam = {}, {}
    for name, weights in (("positive", {"wiki_qa": 1.0, "tech_faq": 1.0}),
                          ("avoid", {"wiki_qa": 1.0, "tech_faq": 1.0, "spam_mail": -1.0})):
        result = dg.materialize(ALL_ASSETS, selection=["selected_subset"], partition_key="small",
                                instance=instance, resources=resources,
                                run_config={"ops": {"selected_subset": {"config": {"task_weights": weights}}}})
        assert result.success
        meta = _meta(result, "selected_subset")
        shares[name] = meta.get("share_mail_spam", 0.0)
        con = duckdb.connect(str(folder / "lineage.duckdb"), read_only=True)
        spam[name] = con.execute("""
            SELECT avg(task_score) FILTER (WHERE e.example_id IN (SELECT example_id FROM selections
                                                                 WHERE selection_id = $s)),
                   avg(task_score)
            FROM explanations e WHERE selection_id = $s AND task = 'spam_mail'""",
                                 {"s": meta["selection_id"]}).fetchone()
        recorded = dict(con.execute("SELECT task, weight FROM selection_weights WHERE selection_id = ?",
                                    [meta["selection_id"]]).fetchall())
        con.close()
        assert recorded == {t: weights.get(t, 0.0) / sum(map(abs, weights.values())) for t in tasks}
    assert shares["avoid"] < shares["positive"]
    selected, pool = spam["avoid"]
    assert selected < pool < spam["positive"][0]


def test_max_mixing_selects_by_each_examples_best_task_and_explains_it(first_run) -> None:
    """task_mixing max on the small crawl: the selection is the top of the engine's max rule
    over the stored task scores, differs from the sum's, records its rule, and each selected
    example's score is the sum of its counted parts in the explanations view."""
    import numpy as np

    from dsdm.selection import combine_task_scores, rank

    folder, resources, _, instance, _ = first_run
    kept = {}
    for mixing in ("sum", "max"):
        result = dg.materialize(ALL_ASSETS, selection=["selected_subset"], partition_key="small",
                                instance=instance, resources=resources, run_config={"ops": {
                                    "selected_subset": {"config": {"task_mixing": mixing}}}})
        assert result.success
        selection_id = _meta(result, "selected_subset")["selection_id"]
        con = duckdb.connect(str(folder / "lineage.duckdb"), read_only=True)
        parts = pl.from_arrow(con.sql(
            "SELECT example_id, task, weight, mixing, task_score, counted FROM explanations "
            "WHERE selection_id = ? ORDER BY example_id, task", params=[selection_id]).arrow())
        chosen = pl.from_arrow(con.sql(
            "SELECT example_id, score FROM selections WHERE selection_id = ? ORDER BY example_id",
            params=[selection_id]).arrow())
        con.close()
        assert parts["mixing"].unique().to_list() == [mixing]
        wide = parts.pivot("task", index="example_id", values="task_score").sort("example_id")
        weights = dict(parts.select("task", "weight").unique().iter_rows())
        tasks = {t: wide[t].to_numpy() for t in weights}
        expected = combine_task_scores(tasks, weights, standardise=True, mixing=mixing)
        ids = wide["example_id"].to_numpy()
        assert set(ids[rank(expected, ids)[:chosen.height]]) == set(chosen["example_id"])
        counted = parts.group_by("example_id").agg(pl.col("counted").sum()).join(
            chosen, on="example_id")
        np.testing.assert_allclose(counted["counted"], counted["score"], rtol=1e-9, atol=1e-12)
        kept[mixing] = set(chosen["example_id"])
    assert kept["max"] != kept["sum"]


def test_mixture_runs_set_source_quotas_filled_by_dsdm_within_each_source(first_run) -> None:
    """mixture_runs on the small crawl, then selected_subset: each source holds exactly the
    quota the fit of those runs chooses, filled with the source's best examples by the
    mixed DsDm score (their stored scores); a retried mixture_runs adopts finished runs."""
    import numpy as np

    from dsdm.mixture import mixture_quotas
    from dsdm.selection import combine_task_scores
    from dsdm_assets.recording import read_manifest
    from dsdm_assets.selection import _pool

    folder, resources, _, instance, _ = first_run
    tiny = {"runs": 4, "fraction": 0.5, "model": {"hidden_size": 32, "num_layers": 1,
                                                   "num_heads": 2, "batch_size": 16}}
    result = dg.materialize(ALL_ASSETS, selection=["mixture_runs", "selected_subset"],
                            partition_key="small", instance=instance, resources=resources,
                            run_config={"ops": {"mixture_runs": {"config": tiny}}})
    assert result.success
    runs_meta, meta = _meta(result, "mixture_runs"), _meta(result, "selected_subset")
    assert runs_meta["runs"] == 4 and "source_quotas" in meta and "mixture_fit" in meta
    runs_folder = folder / "store" / runs_meta["dsdm/manifest"].rsplit("/", 1)[0]
    summary = json.loads((runs_folder / "manifest.json").read_text())["summary"]
    store = resources["store"].get_store()
    corpus = read_manifest(store, _meta(first_run[2], "tokenized_corpus")["dsdm/manifest"],
                           "tokenized_corpus", "small")
    pool_rows = _pool(store, corpus)
    assert [r["run"] for r in summary["runs"]] == [0, 1, 2, 3]
    assert {sum(r["counts"].values()) for r in summary["runs"]} == {round(0.5 * pool_rows.height)}

    con = duckdb.connect(str(folder / "lineage.duckdb"), read_only=True)
    chosen = pl.from_arrow(con.sql("SELECT example_id, source, score FROM selections WHERE "
                                   "selection_id = ?", params=[meta["selection_id"]]).arrow())
    scores = pl.from_arrow(con.sql(
        "SELECT example_id, task, score FROM scores WHERE scores_id = (SELECT scores_id FROM "
        "selection_weights WHERE selection_id = ? LIMIT 1)", params=[meta["selection_id"]]).arrow())
    con.close()
    pool = pool_rows.join(scores.pivot("task", index="example_id", values="score"),
                          on="example_id", maintain_order="left")
    tasks = summary["tasks"]
    mixed = combine_task_scores({t: pool[t].to_numpy() for t in tasks}, None, standardise=True,
                                mixing="max")
    names, available = np.unique(pool["source"].to_numpy(), return_counts=True)
    shares = np.array([[r["counts"][s] for s in names] for r in summary["runs"]], float)
    losses = np.array([[r["losses"][t] for t in tasks] for r in summary["runs"]])
    quotas, _ = mixture_quotas(shares / shares.sum(1, keepdims=True), losses, available,
                               chosen.height, concentration=10.0)
    assert dict(chosen.group_by("source").len().iter_rows()) == {
        s: q for s, q in zip(names.tolist(), quotas.tolist(), strict=True) if q}
    for source in names:
        members = pool.with_columns(pl.Series("mixed", mixed)).filter(pl.col("source") == source)
        kept = chosen.filter(pl.col("source") == source)
        best = set(members.sort("mixed", descending=True)["example_id"][:kept.height])
        assert set(kept["example_id"]) == best
        both = kept.join(members.select("example_id", "mixed"), on="example_id")
        np.testing.assert_allclose(both["score"], both["mixed"], rtol=1e-9)

    # an interrupted attempt: no manifest, one run's record lost; the retry trains only it
    (runs_folder / "manifest.json").unlink()
    (runs_folder / "run-002.json").unlink()
    retry = dg.materialize(ALL_ASSETS, selection=["mixture_runs"], partition_key="small",
                           instance=instance, resources=resources,
                           run_config={"ops": {"mixture_runs": {"config": tiny}}})
    files = json.loads((runs_folder / "manifest.json").read_text())["files"]
    assert retry.success and sorted((f["name"], f["adopted"]) for f in files) == [
        ("run-000.json", True), ("run-001.json", True), ("run-002.json", False),
        ("run-003.json", True)]
    def measured(made: dict) -> list[dict]:  # every run's record but its time
        return [{k: v for k, v in r.items() if k != "seconds"} for r in made["runs"]]

    # the retrained run is the same run: same counts, same losses
    again = json.loads((runs_folder / "manifest.json").read_text())["summary"]
    assert measured(again) == measured(summary)


def test_proxies_of_another_tokenizer_are_refused(first_run) -> None:
    _, resources, _, instance, config = first_run
    retokenised = dg.materialize(
        ALL_ASSETS, selection=["tokenizer", "tokenized_corpus"], partition_key="small",
        instance=instance, resources=resources,
        run_config={"ops": {"tokenizer": {"config": {"vocab_size": 768}},
                            "tokenized_corpus": config["ops"]["tokenized_corpus"]}})
    assert retokenised.success
    for asset in ("semdedup_subset", "gradient_shards", "target_gradients"):
        run_config = {"ops": {asset: config["ops"].get(asset, {"config": {"embedder": "proxy"}})}}
        refused = dg.materialize(ALL_ASSETS, selection=[asset], partition_key="small", instance=instance,
                                 resources=resources, run_config=run_config, raise_on_error=False)
        (failure,) = [e for e in refused.all_events if e.is_step_failure]
        assert "proxy_checkpoints was built from another" in failure.step_failure_data.error.message
