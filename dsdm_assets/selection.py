"""Selection group: subsets of the pool under a budget, ready for training.

`selected_subset` is the DsDm selection. The baselines (`random_subset`, `dsir_subset`,
`classifier_subset`, `semdedup_subset`) are separate assets with the same output contract,
written by the same code (`_write_selection`): a Parquet manifest (rank, example_id, doc_id,
source, score), the selected examples as training shards (token ids + text), rows in the
DuckDB `selections` table under their `method`, and a blocking `size_matches_budget` check.
One asset per method keeps each method's inputs visible in the lineage graph (random needs
only the corpus; SemDeDup the proxies; DsDm the datamodels) and lets a run materialise any
subset of methods (select the assets in the UI, or `dagster asset materialize --select`).
"""

from collections.abc import Callable
from typing import Any, Literal

import dagster as dg
import numpy as np
import polars as pl
import pyarrow as pa
from pydantic import Field, model_validator

from dsdm.artifacts import (
    SCORES,
    SELECTION,
    Upstream,
    checkpoint_paths,
    load_proxy_checkpoint,
    load_tokenizer,
    read_examples,
    selection_shard,
)
from dsdm.baselines import BaselineMethod, PoolData
from dsdm.baselines.classifier import ClassifierSelection
from dsdm.baselines.dsir import DsirSelection
from dsdm.baselines.random import RandomSelection, document_keys
from dsdm.baselines.semdedup import SemDedupSelection, minilm_embeddings, pool_embeddings
from dsdm.explain import mixing_coefficients
from dsdm.lineage import LineageDB
from dsdm.mixture import MixtureObjective, mixture_quotas, quota_scores
from dsdm.selection import (
    DEGENERATE_SHARE,
    Selection,
    TaskMixing,
    combine_task_scores,
    dominant_source,
    normalised_weights,
    rank,
)
from dsdm.store import ArtifactStore
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
from dsdm.tasks import select_texts
from dsdm.tokenization import decode_examples
from dsdm_assets.config import StepConfig
from dsdm_assets.manifests import crawl_asset
from dsdm_assets.recording import AssetWriter, produce, record_rows, require_made_from, run_id
from dsdm_assets.tables import bounded, markdown_table, metadata_key
from resources import ArtifactStoreResource, ComputeResource, LineageResource

GROUP = "selection"
#: bump when the selection folder's contents change (2: scores.parquet of the whole pool;
#: 3: the unit in the manifest, the shards' metadata and the selections table)
SELECTION_VERSION = "3"
#: method name -> the asset that holds its selection (evaluation reads them by this map)
SELECTION_ASSETS = {"dsdm": "selected_subset", "random": "random_subset", "dsir": "dsir_subset",
                    "classifier": "classifier_subset", "semdedup": "semdedup_subset"}


class BudgetConfig(StepConfig):
    """How much to keep (exactly one of fraction/token_budget) and how to shard it."""

    fraction: float | None = Field(
        0.2, gt=0, le=1, description="Share of the pool's examples to keep."
    )
    token_budget: int | None = Field(
        None, gt=0, description="Keep examples in rank order while their tokens fit this budget."
    )
    output_shard_size: int = Field(1024, ge=16, description="Examples per selected-text shard.")
    unit: Literal["example", "document"] = Field(
        "example", description="What is kept or dropped: single examples, or whole documents "
        "(kept in rank order while their tokens fit; fraction then means that share of the "
        "pool's tokens).",
    )
    document_score: Literal["mean", "token_sum"] = Field(
        "mean", description="With unit document (ignored otherwise): a document's score from its examples', the "
        "token-weighted mean (gain per token, the default) or the token-weighted sum "
        "(favours long documents).",
    )

    @model_validator(mode="after")
    def _one_budget(self) -> "BudgetConfig":
        if self.token_budget is not None and "fraction" in self.model_fields_set:
            raise ValueError("set either fraction or token_budget, not both")
        return self

    def budget(self) -> dict[str, Any]:
        """The keyword arguments of `dsdm.selection.select` (an example-unit budget names no
        unit, so selections made before units existed keep their fingerprints)."""
        size = {"token_budget": self.token_budget} if self.token_budget else {"fraction": self.fraction}
        if self.unit == "document":
            return {"unit": "document", "document_score": self.document_score, **size}
        return size


class SelectionConfig(BudgetConfig):
    """Which tasks to select for, and how much to keep (exactly one of fraction/token_budget)."""

    task_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Task -> weight for mixing several target tasks; empty means equal weights.",
    )
    standardise_tasks: bool = Field(
        True, description="Divide each task's scores by their spread over the pool before "
        "mixing, so each task counts as its weight says (raw scores let the task whose loss "
        "moves most dominate).",
    )
    task_mixing: TaskMixing = Field(
        "max", description="How several tasks' scores become one: `sum` (weighted sum) or "
        "`max` (an example counts for the task it serves best, so each task brings its own "
        "top examples; tasks to avoid are subtracted as in the sum).",
    )
    mixture_objective: MixtureObjective = Field(
        "mean", description="With mixture_runs (runs > 0): the source mixture to draw the "
        "budget with, from the per-task fits of loss on mixture: `mean` (best mean predicted "
        "change over the tasks, weighted by task_weights), `worst` (best worst-case task) or "
        "`per_task` (each task's own mix on an equal share). Each source's quota is then "
        "filled with its best examples by the mixed DsDm score (the score stored for them); "
        "the pool's other examples are stored below every selected one. Ignored when "
        "mixture_runs has no runs.",
    )


class TargetTextConfig(BudgetConfig):
    """Budget, plus which tasks' select-split text the method targets."""

    tasks: list[str] = Field(
        default_factory=list,
        description="Target tasks whose select-split text defines the target; empty means all.",
    )


class RandomSubsetConfig(BudgetConfig, RandomSelection):
    """Random selection: seeded uniform sample of the pool under the budget."""


class DsirSubsetConfig(TargetTextConfig, DsirSelection):
    """DSIR: hashed n-gram importance resampling towards the target text."""


class ClassifierSubsetConfig(TargetTextConfig, ClassifierSelection):
    """Quality classifier: linear target-vs-pool model on hashed n-grams, keep the top."""


class SemDedupSubsetConfig(BudgetConfig, SemDedupSelection):
    """SemDeDup: drop embedding near-duplicates, then sample uniformly."""


def _pool(artifacts: ArtifactStore, corpus: Upstream) -> pl.DataFrame:
    """example_id, doc_id, source, n_tokens of every pool example, in corpus order."""
    return pl.concat([pl.from_arrow(table) for table in read_examples(
        artifacts, corpus, columns=["example_id", "doc_id", "source", "n_tokens"])])


def _selection_checks(asset: str) -> list[dg.AssetCheckSpec]:
    return [dg.AssetCheckSpec("size_matches_budget", asset=asset, blocking=True,
                              description="The selection is exactly as large as the budget allows."),
            dg.AssetCheckSpec("source_mix", asset=asset, description=(
                f"Warns when one source makes up {DEGENERATE_SHARE:.0%} or more of the selection "
                "although the pool has several sources."))]


def _write_selection(
    context: dg.AssetExecutionContext, artifacts: ArtifactStore, db: LineageDB, *,
    method: str, config: dict[str, Any], inputs: list[Upstream], corpus: Upstream,
    tokenizer: Upstream, pool: pl.DataFrame, compute_scores: Callable[[], np.ndarray],
    budget: dict[str, Any], output_shard_size: int,
    extra_shares: dict[str, np.ndarray] | None = None,
    extra_metadata: Callable[[str, np.ndarray], dict[str, Any]] | None = None,
) -> dg.MaterializeResult:
    """The selection contract of every method: rank the pool by its scores [N] (larger
    first) and keep the budget; write the scores, the ranked selection and its training
    shards; record the selections rows; report. ``compute_scores`` runs only when no
    finished folder for these inputs exists (a SemDeDup or classifier rerun costs nothing).
    ``extra_shares``: more score vectors whose selections' source shares are shown;
    ``extra_metadata(selection_id, scores)`` adds a method's own metadata (and rows)."""
    asset = context.asset_key.to_user_string()

    def chosen_by(scores: np.ndarray) -> Selection:
        try:
            return select_from_pool(pool, scores, budget)
        except ValueError as error:
            raise dg.Failure(f"{asset}: {error}") from error

    def compute(writer: AssetWriter) -> dict:
        scores = compute_scores()
        chosen = chosen_by(scores)
        selection = selection_frame(pool, chosen)
        writer.write_parquet(SCORES, pa.table({"example_id": pool["example_id"].to_arrow(),
                                               "score": pa.array(scores, pa.float64())}), kind="scores")
        writer.write_parquet(SELECTION, selection.select(SELECTION_COLUMNS).to_arrow(), kind="selection")
        for k, shard in enumerate(training_shards(read_examples(artifacts, corpus), load_tokenizer(
                artifacts, tokenizer), selection, output_shard_size)):
            writer.write_parquet(selection_shard(k), shard, kind="examples")
        return selection_summary(pool, selection, chosen, method)

    chosen_by(np.zeros(pool.height))  # an impossible budget fails before any scoring work
    made = produce(context, artifacts, db,
                   {"method": method, **config, **budget, "output_shard_size": output_shard_size},
                   inputs, compute)
    stored = artifacts.read_parquet(f"{made.folder}/{SCORES}")
    if stored.column("example_id").to_pylist() != pool["example_id"].to_list():
        raise dg.Failure(f"{made.folder}/{SCORES} does not match the pool; delete the folder")
    scores = stored.column("score").to_numpy()
    chosen = chosen_by(scores)
    selection = selection_frame(pool, chosen)
    record_rows(db, "selections", {"crawl": made.writer.crawl, "run_id": run_id(context),
                                   "selection_id": made.writer.config_hash, "method": method},
                selection.select(SELECTION_COLUMNS).to_arrow(), key=["crawl", "selection_id"])
    shares = source_shares(pool, {"selected": selection, **{
        name: pool[chosen_by(task_scores).order] for name, task_scores in (extra_shares or {}).items()}})
    passed, figures = budget_check(pool, scores, chosen.order, budget)
    return made.result({
        "method": method, "selection_id": made.writer.config_hash, "selected": selection.height,
        "pool": pool.height, "selected_tokens": made.summary["tokens"],
        **_selection_metadata(pool, selection, scores, chosen.order, shares),
        **(extra_metadata(made.writer.config_hash, scores) if extra_metadata else {}),
    }, [dg.AssetCheckResult(check_name="size_matches_budget", passed=passed, metadata=figures),
        _source_mix_check(pool, selection)])


def _selection_metadata(pool: pl.DataFrame, selection: pl.DataFrame, scores: np.ndarray,
                        order: np.ndarray, shares: pl.DataFrame) -> dict[str, Any]:
    """What a reader wants to see: source mix vs the pool (also per single task), the score
    distribution, and the best and worst examples."""
    return {
        "source_shares": dg.MetadataValue.md(markdown_table(shares)),
        "score_histogram": dg.MetadataValue.md(markdown_table(score_histogram(scores, order),
                                                              float_digits=5)),
        "top_examples": dg.MetadataValue.md(markdown_table(selection.head(5))),
        "bottom_of_pool": dg.MetadataValue.md(markdown_table(
            pool.with_columns(pl.Series("score", scores)).sort("score").head(5)
            .select("example_id", "source", "score"))),
        **{metadata_key("share_", row["source"]): float(row["selected"])
           for row in shares.to_dicts()},
    }


def _source_mix_check(pool: pl.DataFrame, selection: pl.DataFrame) -> dg.AssetCheckResult:
    mix = dominant_source(selection["source"].to_list(), pool["source"].to_list())
    return dg.AssetCheckResult(
        check_name="source_mix", passed=not mix["degenerate"], severity=dg.AssetCheckSeverity.WARN,
        description=f"{mix['selected_share']:.1%} of the selection is "
        f"{bounded(repr(mix['source']))} (pool: {mix['pool_share']:.1%})",
        metadata={k: bounded(v) if isinstance(v, str) else v
                  for k, v in mix.items() if k != "degenerate"})


@crawl_asset(
    group=GROUP, code_version=SELECTION_VERSION,
    check_specs=_selection_checks("selected_subset"),
    description="The DsDm selection: the examples with the largest predicted target-loss "
    "reduction (task scores mixed by weight and task_mixing) under a budget. A Parquet manifest (rank, "
    "example_id, doc_id, source, score), the selected examples as training shards (token "
    "ids + text), and rows in the DuckDB selections table.",
)
def selected_subset(
    context: dg.AssetExecutionContext,
    config: SelectionConfig,
    datamodel_weights: Upstream,
    mixture_runs: Upstream,
    tokenized_corpus: Upstream,
    tokenizer: Upstream,
    store: ArtifactStoreResource,
    lineage: LineageResource,
) -> dg.MaterializeResult:
    artifacts, db = store.get_store(), lineage.get_db()
    scores = pl.from_arrow(artifacts.read_parquet(datamodel_weights.path_of(SCORES)))
    pool = _pool(artifacts, tokenized_corpus)
    if pool["example_id"].to_list() != scores["example_id"].to_list():
        raise dg.Failure("scores and corpus disagree on the examples; re-materialise datamodel_weights")
    task_scores = {t: scores[t].to_numpy() for t in scores.columns if t != "example_id"}
    try:
        combined = combine_task_scores(task_scores, config.task_weights or None,
                                       standardise=config.standardise_tasks,
                                       mixing=config.task_mixing)
    except ValueError as error:
        raise dg.Failure(f"selected_subset config: {error}") from error
    scores_id = datamodel_weights.manifest["config_hash"]
    inputs, settings = [datamodel_weights, tokenized_corpus, tokenizer], {
        "task_weights": config.task_weights, "standardise_tasks": config.standardise_tasks,
        **({"task_mixing": config.task_mixing} if config.task_mixing != "sum" else {})}
    quotas = _source_quotas(config, mixture_runs, pool, combined, list(task_scores))
    if quotas is not None:  # the datamodel over domains: quotas, DsDm's ranking within each
        require_made_from(mixture_runs, "mixture_runs", tokenized_corpus, "tokenized_corpus")
        inputs.append(mixture_runs)
        settings["mixture_objective"] = config.mixture_objective
        combined = quota_scores(pool["source"].to_numpy(), combined, quotas["quotas"])

    def explain(selection_id: str, mixed: np.ndarray) -> dict[str, Any]:
        record_rows(db, "selection_weights", {
            "crawl": context.partition_key, "run_id": run_id(context),
            "selection_id": selection_id, "scores_id": scores_id},
            _mixing_table(task_scores, config), key=["crawl", "selection_id"])
        return {**_explained_examples(db, scores_id, pool, mixed),
                **(_quota_metadata(quotas) if quotas is not None else {})}

    return _write_selection(
        context, artifacts, db, method="dsdm", config=settings, inputs=inputs,
        corpus=tokenized_corpus, tokenizer=tokenizer, pool=pool, compute_scores=lambda: combined,
        budget=config.budget(), output_shard_size=config.output_shard_size, extra_shares={
            f"only_{t}": values for t, values in task_scores.items()}, extra_metadata=explain,
    )


def _source_quotas(config: SelectionConfig, runs_up: Upstream, pool: pl.DataFrame,
                   combined: np.ndarray, task_names: list[str]) -> dict[str, Any] | None:
    """Per-source counts for the selection from the mixture runs' fit, sized to the number
    of examples the budget keeps under the plain DsDm ranking; with the fit's figures. None
    when mixture_runs has no runs."""
    summary = runs_up.manifest["summary"]
    if not summary["runs"]:
        return None
    names, available = np.unique(pool["source"].to_numpy(), return_counts=True)
    if summary["sources"] != names.tolist():
        raise dg.Failure(f"mixture_runs was made with sources {summary['sources']}, the pool "
                         f"has {names.tolist()}; re-materialise mixture_runs")
    tasks = summary["tasks"]
    if set(tasks) != set(task_names):
        raise dg.Failure(f"mixture_runs measured the tasks {tasks}, the scores are for "
                         f"{sorted(task_names)}; re-materialise mixture_runs")
    shares = np.array([[r["counts"][s] for s in names] for r in summary["runs"]], float)
    losses = np.array([[r["losses"][t] for t in tasks] for r in summary["runs"]])
    kept = len(select_from_pool(pool, combined, config.budget()).order)
    try:
        weights = normalised_weights(dict.fromkeys(tasks), config.task_weights or None)
        counts, fit = mixture_quotas(shares / shares.sum(1, keepdims=True), losses, available,
                                     kept, concentration=runs_up.manifest["config"]["concentration"],
                                     objective=config.mixture_objective,
                                     weights=[weights.get(t, 0.0) for t in tasks])
    except ValueError as error:
        raise dg.Failure(f"selected_subset source quotas: {error}") from error
    return {"quotas": dict(zip(names.tolist(), counts.tolist(), strict=True)),
            "table": pl.DataFrame({
                "source": names.tolist(), "pool_share": available / available.sum(),
                "quota": counts, "quota_share": counts / kept}),
            "fit": pl.DataFrame({"task": tasks, "r2": fit.r2, "r2_leave_one_out": fit.r2_loo,
                                 "loss_sd_over_runs": fit.scale})}


def _quota_metadata(quotas: dict[str, Any]) -> dict[str, Any]:
    return {"source_quotas": dg.MetadataValue.md(markdown_table(quotas["table"], float_digits=4)),
            "mixture_fit": dg.MetadataValue.md(markdown_table(quotas["fit"], float_digits=3))}


def _mixing_table(task_scores: dict[str, np.ndarray], config: SelectionConfig) -> pa.Table:
    """task, weight, coefficient, mixing: how the DsDm selection mixed its task scores."""
    weights = normalised_weights(task_scores, config.task_weights or None)
    coefficients = mixing_coefficients(task_scores, config.task_weights or None,
                                       standardise=config.standardise_tasks)
    return pa.table({"task": list(task_scores),
                     "weight": [weights.get(t, 0.0) for t in task_scores],
                     "coefficient": [coefficients[t] for t in task_scores],
                     "mixing": [config.task_mixing] * len(task_scores)})


def _explained_examples(db: LineageDB, scores_id: str, pool: pl.DataFrame, mixed: np.ndarray,
                        count: int = 5) -> dict[str, Any]:
    """UI tables: the pool's ``count`` best and worst examples by mixed score, each with the
    target it is predicted to help most (best) or hurt most (worst), from the
    explained_targets view that datamodel_weights filled."""
    order = rank(mixed, pool["example_id"].to_numpy())
    pool_rank = np.empty(len(order), dtype=np.int64)
    pool_rank[order] = np.arange(1, len(order) + 1)
    tables = {}
    for key, rows, effect in (("top_examples_explained", order[:count], "helps"),
                              ("bottom_examples_explained", order[::-1][:count], "hurts")):
        chosen = pool[rows].select("example_id", "source").with_columns(
            pl.Series("score", mixed[rows]), pl.Series("pool_rank", pool_rank[rows]))
        first = pl.from_arrow(db.query(
            f"""SELECT example_id, task AS {effect}_most, target_id, tau,
                       continuation AS target_continuation
                FROM explained_targets WHERE scores_id = ? AND effect = ? AND "rank" = 1
                AND example_id IN (SELECT unnest(?))""",
            [scores_id, effect, chosen["example_id"].to_list()]))
        tables[key] = dg.MetadataValue.md(markdown_table(
            chosen.join(first, on="example_id", how="left").sort("pool_rank"), float_digits=5))
    return tables


def _pool_texts(artifacts: ArtifactStore, corpus: Upstream, tokenizer: Upstream) -> list[str]:
    """Decoded text of every pool example, in corpus order."""
    return decode_examples(load_tokenizer(artifacts, tokenizer),
                           read_examples(artifacts, corpus, columns=["input_ids", "n_tokens"]))


def _engine(config: dg.Config, cls: type) -> Any:
    """The engine's method object from an asset config that extends it."""
    return cls.model_validate(config.model_dump(include=set(cls.model_fields)))


def _scores(context: dg.AssetExecutionContext, method: BaselineMethod, data: PoolData) -> np.ndarray:
    try:
        return method.scores(data)
    except ValueError as error:
        raise dg.Failure(f"{context.asset_key.to_user_string()}: {error}") from error


@crawl_asset(
    group=GROUP, code_version=SELECTION_VERSION, check_specs=_selection_checks("random_subset"),
    description="Baseline: a seeded uniform random sample of the pool under the budget "
    "(same contract as selected_subset).",
)
def random_subset(
    context: dg.AssetExecutionContext, config: RandomSubsetConfig,
    tokenized_corpus: Upstream, tokenizer: Upstream,
    store: ArtifactStoreResource, lineage: LineageResource,
) -> dg.MaterializeResult:
    artifacts, db = store.get_store(), lineage.get_db()
    pool = _pool(artifacts, tokenized_corpus)
    method = _engine(config, RandomSelection)
    return _write_selection(
        context, artifacts, db, method=method.name, config=method.model_dump(mode="json"),
        inputs=[tokenized_corpus, tokenizer], corpus=tokenized_corpus, tokenizer=tokenizer,
        pool=pool, budget=config.budget(), output_shard_size=config.output_shard_size,
        compute_scores=lambda: (
            document_keys(pool["doc_id"].to_numpy(), method.seed) if config.unit == "document"
            else _scores(context, method, PoolData(pool["example_id"].to_list()))),
    )


def _text_baseline(
    context: dg.AssetExecutionContext, config: TargetTextConfig, cls: type,
    corpus: Upstream, tokenizer: Upstream, targets: Upstream,
    store: ArtifactStoreResource, lineage: LineageResource,
) -> dg.MaterializeResult:
    """A baseline that scores the pool's text against the target tasks' select-split text."""
    artifacts, db = store.get_store(), lineage.get_db()
    method = _engine(config, cls)

    def compute_scores() -> np.ndarray:
        try:
            target_texts = select_texts(load_tokenizer(artifacts, tokenizer), artifacts.read_parquet(
                targets.only("targets")["path"]), config.tasks)
        except ValueError as error:
            raise dg.Failure(str(error)) from error
        return _scores(context, method, PoolData(_pool_texts(artifacts, corpus, tokenizer), target_texts))

    return _write_selection(
        context, artifacts, db, method=method.name,
        config={**method.model_dump(mode="json"), "tasks": sorted(config.tasks)},
        inputs=[corpus, tokenizer, targets], corpus=corpus, tokenizer=tokenizer,
        pool=_pool(artifacts, corpus), compute_scores=compute_scores,
        budget=config.budget(), output_shard_size=config.output_shard_size,
    )


@crawl_asset(
    group=GROUP, code_version=SELECTION_VERSION, check_specs=_selection_checks("dsir_subset"),
    description="Baseline: DSIR importance resampling (hashed unigram+bigram models of the "
    "target tasks' select-split text and of the pool, Gumbel top-k).",
)
def dsir_subset(
    context: dg.AssetExecutionContext, config: DsirSubsetConfig,
    tokenized_corpus: Upstream, tokenizer: Upstream, target_tasks: Upstream,
    store: ArtifactStoreResource, lineage: LineageResource,
) -> dg.MaterializeResult:
    return _text_baseline(context, config, DsirSelection, tokenized_corpus, tokenizer,
                          target_tasks, store, lineage)


@crawl_asset(
    group=GROUP, code_version=SELECTION_VERSION, check_specs=_selection_checks("classifier_subset"),
    description="Baseline: GPT-3-style quality classifier (linear, hashed n-grams, target "
    "select-split text vs pool); keeps the most target-like examples.",
)
def classifier_subset(
    context: dg.AssetExecutionContext, config: ClassifierSubsetConfig,
    tokenized_corpus: Upstream, tokenizer: Upstream, target_tasks: Upstream,
    store: ArtifactStoreResource, lineage: LineageResource,
) -> dg.MaterializeResult:
    return _text_baseline(context, config, ClassifierSelection, tokenized_corpus, tokenizer,
                          target_tasks, store, lineage)


@crawl_asset(
    group=GROUP, kind="torch", code_version=SELECTION_VERSION,
    check_specs=_selection_checks("semdedup_subset"),
    description="Baseline: SemDeDup-like near-duplicate removal (cosine within k-means "
    "clusters of proxy or MiniLM embeddings), then a uniform sample of the survivors.",
)
def semdedup_subset(
    context: dg.AssetExecutionContext, config: SemDedupSubsetConfig,
    tokenized_corpus: Upstream, tokenizer: Upstream, proxy_checkpoints: Upstream | None,
    compute: ComputeResource, store: ArtifactStoreResource, lineage: LineageResource,
) -> dg.MaterializeResult:
    artifacts, db = store.get_store(), lineage.get_db()
    method = _engine(config, SemDedupSelection)
    inputs, proxies = [tokenized_corpus, tokenizer], None
    if method.embedder == "proxy":
        if proxy_checkpoints is None:
            raise dg.Failure("semdedup_subset embeds with the proxies (embedder: proxy); "
                             "proxy_checkpoints has not been materialised for this crawl")
        require_made_from(proxy_checkpoints, "proxy_checkpoints", tokenized_corpus, "tokenized_corpus")
        inputs, proxies = [*inputs, proxy_checkpoints], proxy_checkpoints
    pool = _pool(artifacts, tokenized_corpus)

    def compute_scores() -> np.ndarray:
        if proxies is not None:
            device = compute.setup()
            model = load_proxy_checkpoint(artifacts, checkpoint_paths(proxies)[0], device)
            embeddings = pool_embeddings(model, read_examples(artifacts, tokenized_corpus), device)
        else:
            embeddings = minilm_embeddings(_pool_texts(artifacts, tokenized_corpus, tokenizer))
        return _scores(context, method, PoolData(pool["example_id"].to_list(), embeddings=embeddings))

    return _write_selection(
        context, artifacts, db, method=method.name, config=method.model_dump(mode="json"),
        inputs=inputs, corpus=tokenized_corpus, tokenizer=tokenizer, pool=pool,
        compute_scores=compute_scores, budget=config.budget(),
        output_shard_size=config.output_shard_size,
        extra_metadata=lambda _, scores: {"near_duplicates": int((scores < 0).sum())},
    )
