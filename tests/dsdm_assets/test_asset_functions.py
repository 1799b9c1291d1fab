"""Assets called as plain functions, the way Dagster's example projects test them: in-memory
`Upstream` inputs (the values the upstream assets returned), a temporary store and DuckDB
file, no Dagster run. A tiny crawl goes documents -> tokenizer -> tokenized_corpus ->
random_subset; each asset reuses its folder when called again with the same inputs."""

import gzip
import json
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from dsdm.artifacts import Upstream
from dsdm.proxy import ProxyConfig
from dsdm_assets.datamodels import _check_same_features, model_for_data
from dsdm_assets.ingest import (
    CorpusConfig,
    DocumentsConfig,
    TokenizerAssetConfig,
    documents,
    tokenized_corpus,
    tokenizer,
)
from dsdm_assets.recording import read_manifest
from dsdm_assets.selection import RandomSubsetConfig, random_subset
from resources import ArtifactStoreResource, CrawlSourceResource, LineageResource

CRAWL = "tiny"


@pytest.fixture()
def resources(tmp_path: Path, demo_rows: list[dict]) -> dict:
    folder = tmp_path / "crawls" / CRAWL
    folder.mkdir(parents=True)
    with gzip.open(folder / "part-00000.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in demo_rows[::40])
    return {"crawls": CrawlSourceResource(root_url=str(tmp_path / "crawls")),
            "store": ArtifactStoreResource(root_url=str(tmp_path / "store")),
            "lineage": LineageResource(database=str(tmp_path / "lineage.duckdb"))}


def _context() -> dg.AssetExecutionContext:
    return dg.build_asset_context(partition_key=CRAWL)


def _ingest(resources: dict) -> dict[str, Upstream]:
    store, lineage = resources["store"], resources["lineage"]
    docs = documents(_context(), config=DocumentsConfig(), crawls=resources["crawls"],
                     store=store, lineage=lineage).value
    tok = tokenizer(_context(), config=TokenizerAssetConfig(vocab_size=512), documents=docs,
                    store=store, lineage=lineage).value
    corpus = tokenized_corpus(_context(), config=CorpusConfig(shard_size=64), documents=docs,
                              tokenizer=tok, store=store, lineage=lineage).value
    return {"documents": docs, "tokenizer": tok, "tokenized_corpus": corpus}


def test_assets_called_with_in_memory_inputs_write_and_reuse_their_folders(resources) -> None:
    made = _ingest(resources)
    corpus = made["tokenized_corpus"]
    assert corpus.path.startswith(f"tokenized_corpus/{CRAWL}/")
    # the corpus was made from exactly the documents and tokenizer handed to it
    assert sorted(i["sha256"] for i in corpus.manifest["inputs"]) == sorted(
        made[a].sha256 for a in ("documents", "tokenizer"))
    assert corpus.manifest["summary"]["examples"] == sum(f["rows"] for f in corpus.files("examples"))

    result = random_subset(_context(), config=RandomSubsetConfig(fraction=0.25),
                           tokenized_corpus=corpus, tokenizer=made["tokenizer"],
                           store=resources["store"], lineage=resources["lineage"])
    meta = {k: v.value if hasattr(v, "value") else v for k, v in result.metadata.items()}
    assert meta["reused"] is False and meta["selected"] == corpus.manifest["summary"]["examples"] // 4
    checks = {c.check_name: c.passed for c in result.check_results}
    assert checks["size_matches_budget"] is True
    rows = duckdb.connect(resources["lineage"].database, read_only=True).execute(
        "SELECT count(*), min(run_id) FROM selections WHERE method = 'random'").fetchone()
    assert rows == (meta["selected"], "direct")

    again = _ingest(resources)
    assert again == made  # same folders, same manifests: reused, not recomputed
    second = tokenizer(_context(), config=TokenizerAssetConfig(vocab_size=512),
                       documents=made["documents"], store=resources["store"],
                       lineage=resources["lineage"])
    assert second.metadata["reused"] is True


def test_a_changed_stored_file_is_named_when_its_manifest_is_read(resources) -> None:
    corpus = _ingest(resources)["tokenized_corpus"]
    store = resources["store"].get_store()
    shard = corpus.files("examples")[0]["path"]
    store.write_bytes(shard, store.read_bytes(shard) + b"!")
    with pytest.raises(dg.Failure, match=r"1 stored file\(s\) are not what its manifest recorded"):
        read_manifest(store, corpus.path, "tokenized_corpus", CRAWL)


def _upstream(config: dict, summary: dict, inputs: list[dict] | None = None) -> Upstream:
    return Upstream("x/manifest.json", "file:///x/manifest.json", "0" * 64,
                    {"config": config, "summary": summary, "inputs": inputs or [], "files": []})


def test_model_for_data_completes_and_refuses_contradictions() -> None:
    tok, corpus = _upstream({}, {"vocab_size": 300}), _upstream({}, {"seq_len": 64})
    model = model_for_data(ProxyConfig(hidden_size=32), tok, corpus)
    assert (model.vocab_size, model.seq_len, model.hidden_size) == (300, 64, 32)
    with pytest.raises(dg.Failure, match=r"model\.vocab_size=999 contradicts the data"):
        model_for_data(ProxyConfig(vocab_size=999), tok, corpus)


def test_candidate_and_target_features_must_match() -> None:
    tasks = _upstream({}, {})
    task_input = {"uri": tasks.uri, "sha256": tasks.sha256}
    grads = _upstream({"target_dim": 256, "batch_size": 16}, {"proxy_checkpoints_sha256": "p"})
    same = _upstream({"target_dim": 256, "batch_size": 64}, {"proxy_checkpoints_sha256": "p"},
                     [task_input])
    _check_same_features(grads, same, tasks)  # batch size is speed only
    other = _upstream({"target_dim": 128, "batch_size": 16}, {"proxy_checkpoints_sha256": "p"},
                      [task_input])
    with pytest.raises(dg.Failure, match="target_dim: 256 vs 128"):
        _check_same_features(grads, other, tasks)
    other_proxies = _upstream(grads.manifest["config"], {"proxy_checkpoints_sha256": "q"},
                              [task_input])
    with pytest.raises(dg.Failure, match="different proxy_checkpoints"):
        _check_same_features(grads, other_proxies, tasks)
    with pytest.raises(dg.Failure, match="not of the latest target_tasks"):
        _check_same_features(grads, _upstream(grads.manifest["config"],
                                              {"proxy_checkpoints_sha256": "p"}), tasks)


def test_source_quotas_need_runs_of_the_same_sources_and_tasks() -> None:
    import numpy as np
    import polars as pl

    from dsdm_assets.selection import SelectionConfig, _source_quotas

    pool = pl.DataFrame({"example_id": [f"e{i}" for i in range(20)], "doc_id": [f"d{i}" for i in range(20)],
                         "source": ["a"] * 10 + ["b"] * 10, "n_tokens": [32] * 20})
    runs = [{"run": r, "counts": {"a": 2 + r, "b": 8 - r}, "losses": {"t": 1.0 + 0.1 * r},
             "seconds": 1.0} for r in range(4)]
    made = _upstream({"concentration": 10.0}, {"runs": runs, "sources": ["a", "b"], "tasks": ["t"]})
    scores, config = np.arange(20.0), SelectionConfig(fraction=0.5)
    quotas = _source_quotas(config, made, pool, scores, ["t"])
    assert sum(quotas["quotas"].values()) == 10
    assert quotas["quotas"]["a"] < 5  # the more of a, the higher the loss: a gets less than half
    assert _source_quotas(config, _upstream({}, {"runs": [], "sources": [], "tasks": []}),
                          pool, scores, ["t"]) is None
    with pytest.raises(dg.Failure, match=r"measured the tasks \['t'\], the scores are for \['u'\]"):
        _source_quotas(config, made, pool, scores, ["u"])
    other = _upstream({"concentration": 10.0}, {"runs": runs, "sources": ["a", "c"], "tasks": ["t"]})
    with pytest.raises(dg.Failure, match="re-materialise mixture_runs"):
        _source_quotas(config, other, pool, scores, ["t"])
