"""Materialise the ingest assets on the demo crawl into a temp store; check DuckDB and reuse."""

import dagster as dg
import duckdb
import pytest

from dsdm_assets.ingest import documents, target_tasks, tokenized_corpus, tokenizer
from dsdm_assets.partitions import crawl_partitions

INGEST_ASSETS = [documents, tokenizer, tokenized_corpus, target_tasks]


@pytest.fixture(scope="module")
def materialised(tmp_path_factory, demo_rows, demo_resources):
    tmp = tmp_path_factory.mktemp("ingest")
    resources = demo_resources(tmp)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(crawl_partitions.name, ["demo"])
    first = dg.materialize(INGEST_ASSETS, partition_key="demo", instance=instance,
                           resources=resources)
    second = dg.materialize(INGEST_ASSETS, partition_key="demo", instance=instance,
                            resources=resources)
    return first, second, tmp / "lineage.duckdb", len(demo_rows)


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    (event,) = result.asset_materializations_for_node(asset)
    return {k: v.value for k, v in event.metadata.items()}


def test_documents_reconcile_with_the_crawl(materialised) -> None:
    first, _, db_path, rows_in_crawl = materialised
    meta = _metadata(first, "documents")
    assert meta["rows_read"] == rows_in_crawl
    assert meta["rows_read"] == meta["accepted"] + meta["quarantined"] + meta["duplicates"]
    con = duckdb.connect(str(db_path), read_only=True)
    quarantined = con.execute("SELECT count(*) FROM quarantine WHERE crawl = 'demo'").fetchone()[0]
    assert quarantined == meta["quarantined"] + meta["duplicates"]
    assert "| source |" in meta["per_source"]


def test_every_artifact_is_in_lineage_with_inputs(materialised) -> None:
    first, _, db_path, _ = materialised
    con = duckdb.connect(str(db_path), read_only=True)
    run = first.run_id
    assets = dict(con.execute(
        "SELECT asset, count(*) FROM artifacts WHERE run_id = ? GROUP BY 1", [run]
    ).fetchall())
    shards = _metadata(first, "tokenized_corpus")["shards"]
    assert assets == {"documents": 3, "tokenizer": 2, "tokenized_corpus": shards + 1,
                      "target_tasks": 2}
    # tokenized_corpus was made from the documents and tokenizer manifests of the same run
    made_from = {r[0] for r in con.execute(
        """SELECT DISTINCT up.asset FROM artifacts a JOIN artifact_inputs i USING (artifact_id)
           JOIN artifacts up ON up.uri = i.input_uri AND up.sha256 = i.input_sha256
           WHERE a.asset = 'tokenized_corpus' AND a.run_id = ? AND up.run_id = ?""",
        [run, run]).fetchall()}
    assert made_from == {"documents", "tokenizer"}
    missing = con.execute("SELECT count(*) FROM artifacts WHERE sha256 IS NULL OR uri IS NULL")
    assert missing.fetchone()[0] == 0


def test_corpus_and_tasks_metadata(materialised) -> None:
    first, *_ = materialised
    corpus = _metadata(first, "tokenized_corpus")
    assert corpus["seq_len"] == 128 and corpus["examples"] > 1000
    tasks = _metadata(first, "target_tasks")
    for task in ("wiki_qa", "lambada_cloze", "tech_faq"):
        assert f"| {task} | select |" in tasks["per_task"]
        assert f"| {task} | eval |" in tasks["per_task"]


def test_second_run_reuses_every_artifact(materialised) -> None:
    first, second, db_path, _ = materialised
    for asset in ("documents", "tokenizer", "tokenized_corpus", "target_tasks"):
        assert _metadata(first, asset)["reused"] is False
        assert _metadata(second, asset)["reused"] is True
        assert _metadata(second, asset)["config_hash"] == _metadata(first, asset)["config_hash"]
    con = duckdb.connect(str(db_path), read_only=True)
    reused = con.execute("SELECT bool_and(reused) FROM artifacts WHERE run_id = ?",
                     [second.run_id]).fetchone()[0]
    assert reused is True



def test_a_target_copied_from_the_pool_is_flagged(tmp_path, demo_rows, demo_resources) -> None:
    import gzip
    import json

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    leak = " ".join(demo_rows[7]["text"].split()[:40])
    rows = [
        {"id": "leak", "split": "select", "prompt": leak, "continuation": " end"},
        {"id": "clean", "split": "eval", "prompt": "Question: what is a datamodel?\nAnswer:",
         "continuation": " a linear predictor"},
    ]
    with gzip.open(tasks / "leaky.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(crawl_partitions.name, ["demo"])
    result = dg.materialize(
        INGEST_ASSETS, partition_key="demo", instance=instance,
        resources=demo_resources(tmp_path, tasks=tasks),
        run_config={"ops": {"target_tasks": {"config": {"tasks": ["leaky"]}}}},
    )
    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == "targets_not_in_pool" and check.passed is False
    assert check.metadata["first_leaks"].value == ["leak"]


def test_a_pool_too_small_for_the_proxies_fails_before_training(tmp_path, demo_rows,
                                                                demo_resources) -> None:
    import gzip
    import json

    from dsdm_assets.datamodels import proxy_checkpoints

    (tmp_path / "crawls" / "tiny").mkdir(parents=True)
    with gzip.open(tmp_path / "crawls" / "tiny" / "part-00000.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in demo_rows[:40])
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(crawl_partitions.name, ["tiny"])
    result = dg.materialize(
        [*INGEST_ASSETS, proxy_checkpoints], partition_key="tiny", instance=instance,
        resources=demo_resources(tmp_path, crawl_root=tmp_path / "crawls"),
        run_config={"ops": {"tokenizer": {"config": {"vocab_size": 512}}}}, raise_on_error=False)
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.message
    assert failure.step_key == "proxy_checkpoints"
    assert "each proxy's share of the pool (train_fraction 0.5 of" in message
    assert "fewer than the 30 a proxy needs" in message and "needs at least 929 examples" in message
    assert not list((tmp_path / "store").glob("proxy_checkpoints/*/*/proxy-00/losses.json"))
