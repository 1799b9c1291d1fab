"""Selection group: the DsDm subset of the pool under a budget, ready for training."""

import dagster as dg
import numpy as np
import polars as pl
import pyarrow as pa
from pydantic import Field, model_validator

from dsdm.selection import combine_task_scores, select_top
from dsdm.tokenization import tokenizer_from_bytes
from dsdm_assets.datamodels import datamodel_weights
from dsdm_assets.ingest import tokenized_corpus, tokenizer
from dsdm_assets.partitions import crawl_partitions
from dsdm_assets.recording import AssetWriter, read_upstream
from dsdm_assets.tables import markdown_table
from resources import ArtifactStoreResource, LineageResource

GROUP = "selection"


class SelectionConfig(dg.Config):
    """Which tasks to select for, and how much to keep (exactly one of fraction/token_budget)."""

    task_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Task -> weight for mixing several target tasks; empty means equal weights.",
    )
    fraction: float | None = Field(
        0.2, gt=0, le=1, description="Share of the pool's examples to keep."
    )
    token_budget: int | None = Field(
        None, gt=0, description="Keep examples in rank order while their tokens fit this budget."
    )
    output_shard_size: int = Field(1024, ge=16, description="Examples per selected-text shard.")

    @model_validator(mode="after")
    def _one_budget(self) -> "SelectionConfig":
        if self.token_budget is not None and "fraction" in self.model_fields_set:
            raise ValueError("set either fraction or token_budget, not both")
        return self


def _shares(frame: pl.DataFrame, name: str) -> pl.DataFrame:
    return frame.group_by("source").agg((pl.len() / frame.height).alias(name))


@dg.asset(
    group_name=GROUP, partitions_def=crawl_partitions, code_version="1",
    deps=[datamodel_weights, tokenized_corpus, tokenizer],
    check_specs=[dg.AssetCheckSpec("size_matches_budget", asset="selected_subset", blocking=True,
                                   description="The selection is exactly as large as the budget allows.")],
    description="The DsDm selection: the examples with the largest predicted target-loss "
    "reduction (task scores mixed by weight) under a budget. A Parquet manifest (rank, "
    "example_id, doc_id, source, score), the selected examples as training shards (token "
    "ids + text), and rows in the DuckDB selections table.",
)
def selected_subset(
    context: dg.AssetExecutionContext,
    config: SelectionConfig,
    store: ArtifactStoreResource,
    lineage: LineageResource,
) -> dg.MaterializeResult:
    artifacts, db = store.get_store(), lineage.get_db()
    weights_up = read_upstream(context, artifacts, "datamodel_weights")
    corpus_up = read_upstream(context, artifacts, "tokenized_corpus")
    tok_up = read_upstream(context, artifacts, "tokenizer")
    budget = {"token_budget": config.token_budget} if config.token_budget else {"fraction": config.fraction}
    writer = AssetWriter(
        context, artifacts, db, "selected_subset",
        {"method": "dsdm", "task_weights": config.task_weights, **budget,
         "output_shard_size": config.output_shard_size},
        [(u.uri, u.sha256) for u in (weights_up, corpus_up, tok_up)],
    )
    scores = pl.from_arrow(artifacts.read_parquet(weights_up.path_of("scores.parquet")))
    pool = pl.concat([
        pl.from_arrow(artifacts.read_parquet(f["path"], columns=["example_id", "doc_id", "source", "n_tokens"]))
        for f in corpus_up.files("examples")
    ])
    if pool["example_id"].to_list() != scores["example_id"].to_list():
        raise dg.Failure("scores and corpus disagree on the examples; re-materialise datamodel_weights")
    tasks = [c for c in scores.columns if c != "example_id"]
    try:
        combined = combine_task_scores({t: scores[t].to_numpy() for t in tasks},
                                       config.task_weights or None)
    except ValueError as error:
        raise dg.Failure(f"selected_subset config: {error}") from error
    keys = pool["example_id"].to_numpy()
    scored_tokens = (pool["n_tokens"] - 1).to_numpy()
    order = select_top(combined, keys, token_counts=scored_tokens, **budget)

    manifest = writer.existing()
    reused = manifest is not None
    selection = pool[order].select("example_id", "doc_id", "source").with_columns(
        pl.Series("rank", np.arange(1, len(order) + 1)), pl.Series("score", combined[order]))
    if reused:
        writer.record(manifest, reused=True)
    else:
        writer.write_parquet("manifest.parquet", selection.select(
            "rank", "example_id", "doc_id", "source", "score").to_arrow(), kind="selection")
        tok = tokenizer_from_bytes(artifacts.read_bytes(tok_up.files("tokenizer")[0]["path"]))
        chosen = set(selection["example_id"].to_list())
        shard_rows: list[pa.Table] = []
        for f in corpus_up.files("examples"):
            table = artifacts.read_parquet(f["path"])
            mask = pa.array([e in chosen for e in table.column("example_id").to_pylist()])
            shard_rows.append(table.filter(mask))
        examples = pa.concat_tables(shard_rows)
        text = [tok.decode(ids[:n]) for ids, n in zip(
            examples.column("input_ids").to_pylist(), examples.column("n_tokens").to_pylist(), strict=True)]
        examples = examples.append_column("text", pa.array(text, pa.string()))
        for index, start in enumerate(range(0, examples.num_rows, config.output_shard_size)):
            writer.write_parquet(f"examples-{index:05d}.parquet",
                                 examples.slice(start, config.output_shard_size), kind="examples")
        manifest = writer.finish({"selected": selection.height, "pool": pool.height,
                                  "tokens": int(scored_tokens[order].sum())})
    n = selection.height
    db.replace_rows("selections", {"crawl": writer.crawl, "selection_id": writer.config_hash},
                    pa.table({
                        "crawl": [writer.crawl] * n, "run_id": [context.run.run_id] * n,
                        "selection_id": [writer.config_hash] * n, "method": ["dsdm"] * n,
                        "rank": selection["rank"], "example_id": selection["example_id"],
                        "doc_id": selection["doc_id"], "source": selection["source"],
                        "score": selection["score"],
                    }))

    # What a reader wants to see: source mix vs the pool (also per single task), the score
    # distribution, and the best and worst documents.
    shares = _shares(pool, "pool").join(_shares(selection, "selected"), on="source", how="left")
    for task in tasks:
        top = select_top(scores[task].to_numpy(), keys, token_counts=scored_tokens, **budget)
        shares = shares.join(_shares(pool[top], f"only_{task}"), on="source", how="left")
    shares = shares.fill_null(0.0).sort("source")
    counts, edges = np.histogram(combined, bins=12)
    histogram = pl.DataFrame({"from": edges[:-1], "to": edges[1:], "examples": counts,
                              "selected": np.histogram(combined[order], bins=edges)[0]})
    expected = _expected_size(combined, keys, scored_tokens, budget)
    return dg.MaterializeResult(
        metadata={
            **writer.base_metadata(manifest, reused),
            "selected": n, "pool": pool.height, "selected_tokens": manifest["summary"]["tokens"],
            "source_shares": dg.MetadataValue.md(markdown_table(shares)),
            "score_histogram": dg.MetadataValue.md(markdown_table(histogram, float_digits=5)),
            "top_examples": dg.MetadataValue.md(markdown_table(selection.head(5))),
            "bottom_of_pool": dg.MetadataValue.md(markdown_table(
                pool.with_columns(pl.Series("score", combined)).sort("score").head(5)
                .select("example_id", "source", "score"))),
            **{f"share_{row['source']}": float(row["selected"]) for row in shares.to_dicts()},
        },
        check_results=[dg.AssetCheckResult(
            check_name="size_matches_budget", passed=n == expected,
            metadata={"selected": n, "expected": expected},
        )],
    )


def _expected_size(scores: np.ndarray, keys: np.ndarray, tokens: np.ndarray, budget: dict) -> int:
    """The budget's size, computed independently of `select_top`."""
    if "fraction" in budget:
        return int(np.floor(budget["fraction"] * len(scores)))
    order = np.lexsort((keys, -scores))
    return int((np.cumsum(tokens[order]) <= budget["token_budget"]).sum())
