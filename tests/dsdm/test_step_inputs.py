"""The small engine functions the pipeline steps are made of: what a step is made from
(crawl files, target rows), how a model config meets the data, the random budget curve, the
target columns of a datamodel, pool positions, featurising a table, decoding examples."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from dsdm.baselines.random import uniform_keys
from dsdm.baselines.semdedup import pool_embeddings, proxy_embeddings
from dsdm.contamination import leaked_target_ids
from dsdm.datamodels import (
    example_ids_digest,
    feature_header,
    feature_stats,
    featurise_table,
    pool_positions,
)
from dsdm.evaluation import random_curve, scaled_budget, target_columns
from dsdm.explain import target_text
from dsdm.features import FeatureConfig
from dsdm.ingest import crawl_inputs, ingest_crawl, ingest_summary
from dsdm.proxy import ProxyConfig, build_proxy, fit_to_data, loss_summary
from dsdm.store import file_sha256
from dsdm.tasks import select_texts, task_counts, tasks_input
from dsdm.tokenization import attention_mask, decode_examples, examples_table


def test_crawl_inputs_hash_every_shard_and_the_summary_reconciles(tmp_path) -> None:
    rows = [{"text": "a document long enough to keep", "source": "web"},
            {"text": "a document long enough to keep", "source": "web"},  # duplicate
            {"text": "short", "source": "web"}]
    with gzip.open(tmp_path / "part-0.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "_SUCCESS").write_text("")
    ((uri, sha),) = crawl_inputs(str(tmp_path))
    assert uri.endswith("part-0.jsonl.gz")
    import fsspec

    assert sha == file_sha256(fsspec.filesystem("file"), str(tmp_path / "part-0.jsonl.gz"))
    summary = ingest_summary(ingest_crawl(str(tmp_path)))
    assert (summary["rows_read"], summary["accepted"], summary["quarantined"],
            summary["duplicates"]) == (3, 1, 1, 1)
    assert summary["per_source"] == [{"source": "web", "documents": 1, "chars": 30}]


def _tasks():
    import polars as pl

    return pl.DataFrame({"id": ["q1", "q2", "q3"], "task": ["qa", "qa", "cloze"],
                         "split": ["select", "eval", "select"],
                         "prompt": ["Question: a?", "Question: b?", "The end of"],
                         "continuation": [" yes", " no", " the story"]})


def test_target_rows_as_an_input_and_their_counts() -> None:
    tasks = _tasks()
    name, digest = tasks_input("data/tasks", ["qa", "cloze"], tasks)
    assert name == "data/tasks#qa,cloze" and len(digest) == 64
    assert tasks_input("data/tasks", ["qa", "cloze"], tasks.with_columns(
        tasks["continuation"].str.replace("yes", "maybe")))[1] != digest
    ids = [[5, 6, 7, 0], [5, 8, 0, 0], [9, 9, 9, 9]]
    table = examples_table(["q1", "q2", "q3"], ["q1", "q2", "q3"], ["qa", "qa", "cloze"], ids,
                           [3, 2, 4], [2, 1, 3])
    table = table.append_column("task", pa.array(["qa", "qa", "cloze"]))
    table = table.append_column("split", pa.array(["select", "eval", "select"]))
    counts = {(r["task"], r["split"]): r["examples"] for r in task_counts(table).to_dicts()}
    assert counts == {("cloze", "select"): 1, ("qa", "eval"): 1, ("qa", "select"): 1}


def test_leaked_targets_are_named() -> None:
    text = "one two three four five six seven eight nine ten eleven twelve thirteen"
    assert leaked_target_ids(["a", "b"], [text, "unrelated words"], ["x " + text + " y"]) == ["a"]


def test_a_model_config_meets_the_data_and_a_curve_summary() -> None:
    assert fit_to_data(ProxyConfig(), 300, 64).vocab_size == 300
    with pytest.raises(ValueError, match=r"model\.seq_len=32 contradicts the data \(64\)"):
        fit_to_data(ProxyConfig(seq_len=32), 300, 64)
    summary = loss_summary([4.0] * 10 + [2.0] * 10)
    assert summary == {"steps": 20, "first_loss": 4.0, "last_loss": 2.0}
    assert loss_summary([3.0]) == {"steps": 1, "first_loss": 3.0, "last_loss": 3.0}


def _pool(n: int = 20) -> pa.Table:
    return pa.table({"example_id": [f"e{i:02d}" for i in range(n)],
                     "doc_id": [f"d{i // 2}" for i in range(n)], "n_tokens": [5] * n})


def test_the_random_curve_continues_the_random_selection() -> None:
    pool = _pool()
    curve = random_curve(pool, {"seed": 3, "fraction": 0.2}, [2.0])
    ((label, (multiple, examples)),) = curve.items()
    assert (label, multiple, examples.num_rows) == ("random@2x", 2.0, 8)
    # the 1x random selection (the top of the same seeded keys) is inside the 2x one
    first = set(np.argsort(-uniform_keys(20, 3), kind="stable")[:4])
    kept = {int(e[1:]) for e in examples.column("example_id").to_pylist()}
    assert first <= kept and examples.column("example_id").to_pylist() == sorted(
        examples.column("example_id").to_pylist())
    assert scaled_budget({"token_budget": 40}, 2.0, 100) == {"token_budget": 80}
    with pytest.raises(ValueError, match=r"random at 3x the fraction 0\.5 exceeds the pool"):
        scaled_budget({"fraction": 0.5}, 3.0, 100)
    with pytest.raises(ValueError, match="needs 120 tokens; the pool has 100"):
        scaled_budget({"token_budget": 40}, 3.0, 100)


def test_target_columns_in_column_order() -> None:
    targets = pa.table({"example_id": ["a", "b", "c"], "task": ["x", "y", "x"]})
    assert target_columns(targets, ["c", "a"]).column("example_id").to_pylist() == ["c", "a"]
    with pytest.raises(ValueError, match=r"missing from target_tasks: \['z'\]"):
        target_columns(targets, ["a", "z"])


def test_pool_positions_refuse_examples_of_another_corpus() -> None:
    assert pool_positions(["a", "b", "c"], ["c", "a"]).tolist() == [2, 0]
    with pytest.raises(ValueError, match="1 of its 2 examples are not in this tokenized corpus"):
        pool_positions(["a", "b"], ["a", "z"])


def test_featurise_a_table_and_its_stats(tiny_config) -> None:
    config = tiny_config.model_copy(update={"seq_len": 8})
    model = build_proxy(config)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, config.vocab_size, (4, 8), generator=gen).tolist()
    table = examples_table([f"e{i}" for i in range(4)], ["d"] * 4, ["s"] * 4, ids,
                           [8, 6, 8, 5], [1, 1, 1, 1])
    data, seconds = featurise_table(model, table, FeatureConfig(target_dim=16, factor_dim=8),
                                    proxy=1, source="x")
    header = feature_header(data, "x")
    assert header["proxy"] == "1" and header["example_ids_sha256"] == example_ids_digest(
        [f"e{i}" for i in range(4)])
    assert feature_stats(data, "x") == (0, 16, False) and seconds >= 0
    mask = attention_mask(table)
    assert mask.sum(1).tolist() == [8, 6, 8, 5]
    whole = proxy_embeddings(model, torch.tensor(ids), mask)
    shards = pool_embeddings(model, [table.slice(0, 2), table.slice(2)])
    np.testing.assert_allclose(shards, whole, rtol=1e-5, atol=1e-6)


def test_decoding_examples_and_target_text(demo_docs) -> None:
    from dsdm.tokenization import TokenizerConfig, train_bpe

    tok = train_bpe([d["text"] for d in demo_docs[:50]], TokenizerConfig(vocab_size=300))
    ids = [[*tok.encode("hello there").ids, 0, 0], tok.encode("good morning").ids]
    table = pa.table({"input_ids": ids, "n_tokens": [len(ids[0]) - 2, len(ids[1])]})
    assert decode_examples(tok, [table]) == [tok.decode(ids[0][:-2]), tok.decode(ids[1])]
    prompt = tok.encode("Question: why?").ids
    answer = tok.encode(" because").ids
    targets = examples_table(["t"], ["t"], ["qa"], [prompt + answer], [len(prompt + answer)],
                             [len(prompt)]).append_column("task", pa.array(["qa"]))
    text = target_text(tok, targets, ["t"]).to_pylist()[0]
    assert text["task"] == "qa" and text["continuation"].strip() == "because"
    targets = targets.append_column("split", pa.array(["select"]))
    assert select_texts(tok, targets) == [tok.decode(prompt + answer)]
    with pytest.raises(ValueError, match=r"tasks \['wiki'\] are not among the target tasks"):
        select_texts(tok, targets, ["wiki"])
