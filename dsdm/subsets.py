"""What every selection method hands on, the same for DsDm and the baselines: the ranked
selection, its training shards (token ids + decoded text), and the figures that describe it
(source shares, score histogram, whether its size matches the budget).

`dsdm.selection` decides what is kept; this module turns that decision into tables. The pool
is a frame with one row per example in corpus order: example_id, doc_id, source, n_tokens.
"""

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
from tokenizers import Tokenizer

from dsdm.selection import Selection, select

#: the columns of a selection manifest, in order (also the `selections` table's, after its ids)
SELECTION_COLUMNS = ["rank", "example_id", "doc_id", "source", "score", "unit"]


def scored_tokens(pool: pl.DataFrame) -> np.ndarray:
    """[N] tokens per example that carry a loss (every token after the first)."""
    return (pool["n_tokens"] - 1).to_numpy()


def select_from_pool(pool: pl.DataFrame, scores: np.ndarray, budget: Mapping[str, Any]) -> Selection:
    """`dsdm.selection.select` on the pool's scores [N] (larger first, ties by example_id)
    under ``budget`` (its keyword arguments: fraction or token_budget, unit, ...)."""
    return select(scores, pool["example_id"].to_numpy(), scored_tokens(pool),
                  doc_ids=pool["doc_id"].to_numpy(), **budget)


def selection_frame(pool: pl.DataFrame, chosen: Selection) -> pl.DataFrame:
    """The kept examples in rank order (example_id, doc_id, source, rank, score, unit), each
    with the score of the unit (example or document) that kept it; stored as
    `SELECTION_COLUMNS`."""
    order = chosen.order
    return pool[order].select("example_id", "doc_id", "source").with_columns(
        pl.Series("rank", np.arange(1, len(order) + 1)), pl.Series("score", chosen.unit_scores),
        pl.lit(chosen.unit).alias("unit"))


def selection_summary(pool: pl.DataFrame, selection: pl.DataFrame, chosen: Selection,
                      method: str) -> dict[str, Any]:
    """What a selection's manifest summarises: its size, the pool's, its scored tokens."""
    return {"selected": selection.height, "pool": pool.height,
            "tokens": int(scored_tokens(pool)[chosen.order].sum()), "method": method,
            "unit": chosen.unit, "documents": selection["doc_id"].n_unique()}


def training_shards(corpus: Iterable[pa.Table], tokenizer: Tokenizer, selection: pl.DataFrame,
                    shard_size: int) -> Iterator[pa.Table]:
    """The selected examples (the corpus columns plus their decoded ``text``), in corpus
    order, ``shard_size`` rows per table; the schema metadata names the selection unit
    (``dsdm.unit``)."""
    chosen = set(selection["example_id"].to_list())
    kept = []
    for table in corpus:
        mask = pa.array([e in chosen for e in table.column("example_id").to_pylist()])
        kept.append(table.filter(mask))
    examples = pa.concat_tables(kept)
    text = [tokenizer.decode(ids[:n]) for ids, n in zip(
        examples.column("input_ids").to_pylist(), examples.column("n_tokens").to_pylist(), strict=True)]
    examples = examples.append_column("text", pa.array(text, pa.string()))
    examples = examples.replace_schema_metadata(
        {**(examples.schema.metadata or {}), b"dsdm.unit": selection["unit"][0].encode()})
    for start in range(0, examples.num_rows, shard_size):
        yield examples.slice(start, shard_size)


def source_shares(pool: pl.DataFrame, selections: Mapping[str, pl.DataFrame]) -> pl.DataFrame:
    """source, pool, and one column per named selection: each source's share of the pool and
    of each selection (0 where absent), sorted by source."""

    def shares(frame: pl.DataFrame, name: str) -> pl.DataFrame:
        return frame.group_by("source").agg((pl.len() / frame.height).alias(name))

    table = shares(pool, "pool")
    for name, frame in selections.items():
        table = table.join(shares(frame, name), on="source", how="left")
    return table.fill_null(0.0).sort("source")


def score_histogram(scores: np.ndarray, order: np.ndarray, bins: int = 12) -> pl.DataFrame:
    """from, to, examples, selected: the pool's scores [N] in ``bins`` equal bins, and how
    many of the selected examples (pool indices ``order``) fall in each."""
    counts, edges = np.histogram(scores, bins=bins)
    return pl.DataFrame({"from": edges[:-1], "to": edges[1:], "examples": counts,
                         "selected": np.histogram(scores[order], bins=edges)[0]})


def budget_check(pool: pl.DataFrame, scores: np.ndarray, order: np.ndarray,
                 budget: Mapping[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Whether a selection (pool indices ``order``) is as large as its budget allows,
    computed independently of `dsdm.selection.select`, with the figures that say why.
    Examples: as many as the fraction or token budget allows. Documents: whole ones, within
    the tokens, and no left-out document that would still fit."""
    tokens = scored_tokens(pool)
    n = len(order)
    if budget.get("unit") != "document":
        if "fraction" in budget:
            expected = int(np.floor(budget["fraction"] * len(scores)))
        else:
            ranked = np.lexsort((pool["example_id"].to_numpy(), -scores))
            expected = int((np.cumsum(tokens[ranked]) <= budget["token_budget"]).sum())
        return n == expected, {"selected": n, "expected": expected}
    limit = budget.get("token_budget") or int(np.floor(budget["fraction"] * tokens.sum()))
    kept = pool["doc_id"].is_in(pool["doc_id"][order].implode()).to_numpy()
    used = int(tokens[order].sum())
    left_out = (pool.filter(~kept).group_by("doc_id").agg((pl.col("n_tokens") - 1).sum())
                ["n_tokens"])
    smallest_left_out = int(left_out.min()) if len(left_out) else None
    whole = int(kept.sum()) == n
    fits = smallest_left_out is not None and smallest_left_out <= limit - used
    return whole and used <= limit and not fits, {
        "selected": n, "selected_tokens": used, "token_budget": int(limit),
        "whole_documents": whole, "smallest_left_out_document": smallest_left_out}
