"""The selection contract's tables: ranked frame, training shards, shares, histogram, and the
independent budget check."""

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from tokenizers import Tokenizer, models

from dsdm.subsets import (
    SELECTION_COLUMNS,
    budget_check,
    score_histogram,
    select_from_pool,
    selection_frame,
    selection_summary,
    source_shares,
    training_shards,
)


@pytest.fixture()
def pool() -> pl.DataFrame:
    # six examples of four documents; n_tokens - 1 tokens of each carry a loss
    return pl.DataFrame({"example_id": [f"e{i}" for i in range(6)],
                         "doc_id": ["a", "a", "b", "c", "c", "d"],
                         "source": ["web", "web", "code", "web", "web", "code"],
                         "n_tokens": [5, 3, 9, 4, 4, 2]})


def test_the_frame_is_the_top_of_the_scores_in_rank_order(pool) -> None:
    scores = np.array([0.1, 0.9, 0.5, -1.0, 0.7, 0.0])
    chosen = select_from_pool(pool, scores, {"fraction": 0.5})
    frame = selection_frame(pool, chosen)
    assert frame["example_id"].to_list() == ["e1", "e4", "e2"]
    assert frame["rank"].to_list() == [1, 2, 3] and frame["score"].to_list() == [0.9, 0.7, 0.5]
    assert set(frame.columns) == set(SELECTION_COLUMNS) and frame["unit"].to_list() == ["example"] * 3
    summary = selection_summary(pool, frame, chosen, "dsdm")
    assert summary == {"selected": 3, "pool": 6, "tokens": 2 + 3 + 8, "method": "dsdm",
                       "unit": "example", "documents": 3}
    assert budget_check(pool, scores, chosen.order, {"fraction": 0.5}) == (
        True, {"selected": 3, "expected": 3})
    assert budget_check(pool, scores, chosen.order[:2], {"fraction": 0.5})[0] is False


def test_whole_documents_and_the_check_that_none_left_out_would_fit(pool) -> None:
    scores = np.array([0.1, 0.9, 0.5, -1.0, 0.7, 0.0])
    budget = {"unit": "document", "token_budget": 10}
    chosen = select_from_pool(pool, scores, budget)
    frame = selection_frame(pool, chosen)
    kept = set(frame["doc_id"].to_list())
    assert pool.filter(pl.col("doc_id").is_in(list(kept))).height == frame.height
    passed, figures = budget_check(pool, scores, chosen.order, budget)
    assert passed and figures["whole_documents"] and figures["selected_tokens"] <= 10
    # dropping one example of a kept document breaks the "whole documents" rule
    assert budget_check(pool, scores, chosen.order[1:], budget)[0] is False


def test_training_shards_keep_corpus_order_decode_and_name_the_unit(pool) -> None:
    vocab = {chr(ord("a") + i): i for i in range(10)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    corpus = [pa.table({"example_id": [f"e{i}" for i in range(k, k + 3)],
                        "input_ids": [[i % 10, (i + 1) % 10, 0] for i in range(k, k + 3)],
                        "n_tokens": [2, 2, 2]}) for k in (0, 3)]
    frame = selection_frame(pool, select_from_pool(pool, np.arange(6.0)[::-1], {"fraction": 0.5}))
    shards = list(training_shards(corpus, tokenizer, frame, shard_size=2))
    assert [s.num_rows for s in shards] == [2, 1]
    table = pa.concat_tables(shards)
    assert table.column("example_id").to_pylist() == ["e0", "e1", "e2"]
    assert table.column("text").to_pylist() == ["a b", "b c", "c d"]
    assert all(s.schema.metadata[b"dsdm.unit"] == b"example" for s in shards)


def test_shares_and_histogram(pool) -> None:
    selected = pool.filter(pl.col("source") == "code")
    shares = source_shares(pool, {"selected": selected, "other": pool[:1]})
    assert shares.to_dicts() == [
        {"source": "code", "pool": 2 / 6, "selected": 1.0, "other": 0.0},
        {"source": "web", "pool": 4 / 6, "selected": 0.0, "other": 1.0}]
    histogram = score_histogram(np.arange(6.0), np.array([4, 5]), bins=3)
    assert histogram["examples"].to_list() == [2, 2, 2] and histogram["selected"].to_list() == [0, 0, 2]
