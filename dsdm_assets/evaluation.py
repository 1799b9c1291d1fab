"""Evaluation group: how good each selection is, and how good the datamodels are.

`evaluations` trains an evaluation LM per (method, seed) on exactly each selection, plus
random selections at larger budgets for the compute-multiplier curve, and measures the
eval-split target losses; `datamodel_lds` trains models on random subsets of the pool and
correlates their target losses with what the datamodel weights predict. Each trained model's
result is written as soon as it exists, under a key of everything it depends on
(`model_result_key`: training examples, recipe and seed, targets), outside the asset's own
folder: an interrupted run resumes with the rest, and a later evaluation re-trains only the
models whose inputs changed (a new DsDm estimator: DsDm's models; the baselines' and the
random curve's are adopted). The same holds for LDS models, so a new estimator re-uses all.
"""

import hashlib
import json

import dagster as dg
import numpy as np
import polars as pl
import pyarrow as pa
from pydantic import Field, field_validator

from dsdm.artifacts import (
    LDS,
    LDS_LOSSES,
    MULTIPLIERS,
    REPORT,
    REPORT_PLOT,
    RESULTS,
    TARGET_COLUMNS,
    UNIGRAM,
    Upstream,
    load_tau,
    read_examples,
)
from dsdm.datamodels import proxy_subsets
from dsdm.evaluation import (
    POOL_ENTROPY,
    example_losses,
    lds_ceiling,
    linear_datamodeling_score,
    random_curve,
    target_columns,
    target_losses,
    train_evaluation_model,
    unigram_reference,
)
from dsdm.lineage import LineageDB
from dsdm.proxy import ProxyConfig, loss_summary
from dsdm.report import multipliers, plot_png, summarise, wide_table
from dsdm.store import ArtifactStore, fingerprint
from dsdm.tokenization import to_tensors
from dsdm_assets.config import StepConfig
from dsdm_assets.datamodels import model_for_data, refuse_model_seed
from dsdm_assets.manifests import crawl_asset
from dsdm_assets.recording import AssetWriter, produce, record_rows, run_id
from dsdm_assets.selection import SELECTION_ASSETS
from dsdm_assets.tables import markdown_table
from resources import ArtifactStoreResource, ComputeResource, LineageResource

GROUP = "evaluation"


class EvalModelConfig(StepConfig, ProxyConfig):
    """Evaluation LM architecture and recipe (default: larger than the default proxy).
    vocab_size and seq_len come from the tokenizer and corpus."""

    hidden_size: int = Field(192, gt=0)
    num_layers: int = Field(3, gt=0)
    num_heads: int = Field(4, gt=0)


class EvaluationConfig(StepConfig):
    """Which selections to evaluate, with what model, seeds and random budgets."""

    methods: list[str] = Field(
        default_factory=lambda: list(SELECTION_ASSETS),
        description=f"Selections to evaluate, among {sorted(SELECTION_ASSETS)}; random is required.",
    )
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1,
                             description="Evaluation model seeds (init and data order).")
    random_multiples: list[float] = Field(
        default_factory=lambda: [2.0],
        description="Random budgets beyond 1x for the multiplier curve, e.g. [2, 4].")
    eval_batch_size: int = Field(64, ge=1, description="Examples per forward when scoring.")
    model: EvalModelConfig = Field(default_factory=EvalModelConfig)

    @field_validator("methods")
    @classmethod
    def _known(cls, methods: list[str]) -> list[str]:
        unknown = sorted(set(methods) - set(SELECTION_ASSETS))
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose among {sorted(SELECTION_ASSETS)}")
        if "random" not in methods:
            raise ValueError("methods must include 'random': multipliers are measured against it")
        return methods

    @field_validator("random_multiples")
    @classmethod
    def _above_one(cls, multiples: list[float]) -> list[float]:
        if not multiples or any(not m > 1 for m in multiples):
            raise ValueError(f"random_multiples must be non-empty and each > 1, got {multiples}")
        return sorted(set(multiples))

    @field_validator("model")
    @classmethod
    def _seeded_by_seeds(cls, model: EvalModelConfig) -> EvalModelConfig:
        return refuse_model_seed(model, "evaluations.seeds (one model per seed)")


REPLICATE_SEED_STRIDE = 1000
"""The model of subset k and replicate r has seed ``LdsConfig.seed + k + r * stride``: every
model's seed is distinct, and replicate 0's are those of a one-seed run."""


class LdsConfig(StepConfig):
    """Linear datamodeling score: models on random subsets of the pool (proxy recipe)."""

    num_models: int = Field(8, ge=3, le=REPLICATE_SEED_STRIDE,
                            description="Random subsets (the Spearman's n).")
    seeds_per_subset: int = Field(
        1, ge=1, description="Models trained on each subset, each with its own seed; the LDS "
        "correlates the prediction with their mean loss, the expected loss a datamodel "
        "predicts (with one, training noise bounds the LDS well below 1). The models of the "
        "first seed are the ones a run with fewer seeds trained, and are reused.")
    fraction: float | None = Field(None, gt=0, le=1,
                                   description="Subset share of the pool; None: the proxies' train_fraction.")
    seed: int = Field(1000, description="Seeds subsets and models; differ from the proxies' seeds.")
    eval_batch_size: int = Field(64, ge=1, description="Examples per forward when scoring.")


def _examples(artifacts: ArtifactStore, upstream: Upstream) -> pa.Table:
    """Every example of a corpus or a selection, in order."""
    return pa.concat_tables(read_examples(artifacts, upstream))


MODEL_RESULT_VERSION = "1"
"""Part of every trained-model result's key: bump when training or scoring changes."""


def _ids_digest(example_ids: pa.Array | pa.ChunkedArray) -> str:
    return hashlib.sha256("\n".join(sorted(example_ids.to_pylist())).encode()).hexdigest()


def model_result_key(kind: str, config: ProxyConfig, examples: pa.Table, corpus: Upstream,
                     targets: Upstream, precision: str) -> str:
    """What one trained model's measured losses depend on, and nothing else: the training
    examples (by id, within this corpus), the recipe with its seed, the targets it is scored
    on and the arithmetic. Evaluations that share a model (the random curve, a baseline's
    unchanged selection) find its result under this key instead of training it again."""
    return fingerprint(kind, MODEL_RESULT_VERSION, config.to_dict(),
                       _ids_digest(examples.column("example_id")), corpus.manifest["config_hash"],
                       targets.manifest["config_hash"], precision)


def _precision(compute: ComputeResource) -> str:
    device = compute.setup()
    return "bf16" if compute.dtype == "bfloat16" and device.type == "cuda" else "fp32"


def _train_and_score(
    context: dg.AssetExecutionContext, writer: AssetWriter, name: str, config: ProxyConfig,
    examples: pa.Table, targets: pa.Table, keys: tuple[Upstream, Upstream],
    compute: ComputeResource, batch_size: int,
) -> dict:
    """One evaluation model's losses: a result another evaluation already made for the same
    examples, recipe, seed and targets is adopted (and checked) instead of retrained."""
    precision = _precision(compute)
    key = model_result_key("evaluation_model", config, examples, *keys, precision)
    path = writer.shared_path("evaluation_models", key)
    data = writer.adopt_shared(path, kind="run")
    if data is not None:
        result = json.loads(data)
        if result.get("key") != key or result.get("examples") != examples.num_rows:
            raise dg.Failure(f"{path} does not hold the result it is stored under (key "
                             f"{result.get('key')!r}, {result.get('examples')} examples); "
                             "delete it to retrain that model")
        context.log.info(f"{name}: reusing the model trained earlier ({path})")
        return result
    device = compute.setup()
    context.log.info(f"{name}: training on {examples.num_rows} examples")
    model, curve = train_evaluation_model(config, examples, device=device, bf16=precision == "bf16")
    losses = target_losses(model, targets, batch_size=batch_size, device=device)
    result = {"key": key, "label": name, "losses": losses.to_dicts(),
              "examples": examples.num_rows, "steps": len(curve),
              "final_train_loss": loss_summary(curve)["last_loss"]}
    writer.write_shared(path, json.dumps(result).encode(), kind="run")
    return result


@crawl_asset(
    group=GROUP, kind="torch", code_version="1",
    description="Evaluation LMs trained on each selection (and on random selections at larger "
    "budgets); eval-split loss per target task and on held-out text, each method's compute "
    "multiplier vs random, a report (markdown + PNG) and rows in the DuckDB evaluations table.",
)
def evaluations(
    context: dg.AssetExecutionContext, config: EvaluationConfig,
    tokenizer: Upstream, tokenized_corpus: Upstream, target_tasks: Upstream,
    selected_subset: Upstream | None, random_subset: Upstream, dsir_subset: Upstream | None,
    classifier_subset: Upstream | None, semdedup_subset: Upstream | None,
    compute: ComputeResource, store: ArtifactStoreResource, lineage: LineageResource,
) -> dg.MaterializeResult:
    artifacts, db = store.get_store(), lineage.get_db()
    given = {"selected_subset": selected_subset, "random_subset": random_subset,
             "dsir_subset": dsir_subset, "classifier_subset": classifier_subset,
             "semdedup_subset": semdedup_subset}
    selections = {m: given[SELECTION_ASSETS[m]] for m in config.methods}
    if missing := [SELECTION_ASSETS[m] for m, up in selections.items() if up is None]:
        raise dg.Failure(f"{', '.join(missing)} not materialised for crawl "
                         f"{context.partition_key!r}; run them first or leave their methods out")
    model = model_for_data(config.model, tokenizer, tokenized_corpus)
    made = produce(
        context, artifacts, db,
        {"methods": sorted(config.methods), "seeds": config.seeds,
         "random_multiples": config.random_multiples, "model": model.to_dict()},
        [tokenizer, tokenized_corpus, target_tasks, *selections.values()],
        lambda writer: _evaluate(context, writer, config, model, selections, tokenizer,
                                 tokenized_corpus, target_tasks, compute))
    results = pl.from_arrow(artifacts.read_parquet(f"{made.folder}/{RESULTS}"))
    unigram = pl.from_arrow(artifacts.read_parquet(f"{made.folder}/{UNIGRAM}"))
    mults = multipliers(summarise(results))
    _record_rows(db, made.writer, run_id(context), results, mults, unigram, selections)
    return made.result({
        **{f"unigram_{r['task']}": r["loss"] for r in unigram.to_dicts()},
        "report": dg.MetadataValue.md(artifacts.read_bytes(f"{made.folder}/{REPORT}").decode()),
        "plot": dg.MetadataValue.path(artifacts.uri(f"{made.folder}/{REPORT_PLOT}")),
        "models": made.summary["models"],
        **{f"multiplier_{r['method']}_{r['task']}": float(r["multiplier"]) for r in mults.to_dicts()},
    })


def _evaluate(context: dg.AssetExecutionContext, writer: AssetWriter, config: EvaluationConfig,
              model: ProxyConfig, selections: dict[str, Upstream], tok_up: Upstream,
              corpus_up: Upstream, targets_up: Upstream, compute: ComputeResource) -> dict:
    """Train and score an evaluation model per (selection or random budget, seed), adopting
    results another evaluation made; results, unigram reference, report and multipliers into
    ``writer``'s folder; the summary."""
    artifacts = writer.store
    targets = artifacts.read_parquet(targets_up.only("targets")["path"])
    runs = {m: (1.0, _examples(artifacts, up)) for m, up in selections.items()}
    pool = _examples(artifacts, corpus_up)
    unigram = unigram_reference(pool, targets, tok_up.manifest["summary"]["vocab_size"])
    writer.write_parquet(UNIGRAM, unigram.to_arrow(), kind="unigram")
    try:  # the random curve continues random_subset: same seed, same unit, larger budgets
        runs.update(random_curve(pool, selections["random"].manifest["config"],
                                 config.random_multiples))
    except ValueError as error:
        raise dg.Failure(str(error)) from error
    rows = []
    for label, (multiple, examples) in runs.items():
        for seed in config.seeds:
            result = _train_and_score(context, writer, f"{label}-seed{seed}",
                                      model.model_copy(update={"seed": seed}), examples,
                                      targets, (corpus_up, targets_up), compute,
                                      config.eval_batch_size)
            for entry in result["losses"]:
                rows.append({"method": label.split("@")[0], "budget": multiple, "seed": seed,
                             "task": entry["task"], "loss": entry["loss"],
                             "examples": result["examples"], "steps": result["steps"]})
    results = pl.DataFrame(rows)
    writer.write_parquet(RESULTS, results.to_arrow(), kind="results")
    summary = summarise(results)
    mults = multipliers(summary)
    report = _report_markdown(wide_table(summary, mults), unigram, model, config)
    writer.write_bytes(REPORT, report.encode(), kind="report")
    writer.write_bytes(REPORT_PLOT, plot_png(summary, f"crawl {writer.crawl}"), kind="plot")
    writer.write_parquet(MULTIPLIERS, mults.to_arrow(), kind="multipliers")
    return {"models": len(runs) * len(config.seeds), "methods": config.methods,
            "multipliers": mults.to_dicts()}


def _report_markdown(table: pl.DataFrame, unigram: pl.DataFrame, model: ProxyConfig,
                     config: EvaluationConfig) -> str:
    arch = f"{model.num_layers} layers, hidden {model.hidden_size}, {model.num_heads} heads"
    lines = [
        "# Selection comparison",
        "",
        f"Evaluation model: GPT-NeoX, {arch}; {model.epochs} pass(es) over each selection; "
        f"seeds {config.seeds}.",
        "Loss: mean next-token loss (nats) over the continuation tokens of each task's eval "
        "split; heldout_text scores every token of the eval split's prompt + continuation.",
        "Columns 'x task': compute multiplier vs random (random budget matching the loss, "
        "log-interpolated; 'extrap.' = outside the random curve).",
        "",
        markdown_table(table, float_digits=4),
        "",
        "Reference, a unigram model of the pool (add-one smoothed): "
        + ", ".join(f"{r['task']} {r['loss']:.3f}" for r in unigram.to_dicts()
                    if r["task"] != POOL_ENTROPY)
        + f"; the pool's unigram entropy is {_entropy(unigram):.3f} nats/token.",
    ]
    return "\n".join(lines) + "\n"


def _entropy(unigram: pl.DataFrame) -> float:
    return float(unigram.filter(pl.col("task") == POOL_ENTROPY)["loss"][0])


def _record_rows(db: LineageDB, writer: AssetWriter, run_id: str, results: pl.DataFrame,
                 mults: pl.DataFrame, unigram: pl.DataFrame, selections: dict[str, Upstream]) -> None:
    selection_ids = {m: up.manifest["config_hash"] for m, up in selections.items()}
    loss_rows = results.select(
        pl.col("method"), pl.col("budget"), pl.col("seed").cast(pl.Int64), pl.col("task"),
        pl.lit("loss").alias("metric"), pl.col("loss").alias("value"))
    mult_rows = mults.select(
        pl.col("method"), pl.lit(1.0).alias("budget"), pl.lit(None, pl.Int64).alias("seed"),
        pl.col("task"), pl.lit("multiplier").alias("metric"), pl.col("multiplier").alias("value"))
    rows = pl.concat([loss_rows, mult_rows])
    rows = rows.with_columns(
        pl.when(pl.col("budget") == 1.0).then(pl.col("method").replace_strict(
            selection_ids, default=None)).otherwise(None).alias("selection_id"),
        pl.Series("method", [m if b == 1.0 else f"{m}@{b:g}x" for m, b in
                             zip(rows["method"].to_list(), rows["budget"].to_list(), strict=True)]))
    reference = unigram.select(
        pl.lit("unigram").alias("method"), pl.lit(None, pl.Float64).alias("budget"),
        pl.lit(None, pl.Int64).alias("seed"), pl.col("task"),
        pl.when(pl.col("task") == POOL_ENTROPY).then(pl.lit("entropy")).otherwise(pl.lit("loss"))
        .alias("metric"), pl.col("loss").alias("value"), pl.lit(None, pl.String).alias("selection_id"))
    _replace_evaluations(db, writer, run_id, pl.concat([rows, reference], how="diagonal_relaxed"))


def _replace_evaluations(db: LineageDB, writer: AssetWriter, run_id: str, rows: pl.DataFrame) -> None:
    record_rows(db, "evaluations", {"crawl": writer.crawl, "run_id": run_id,
                                    "evaluation_id": writer.config_hash}, rows.select(
        pl.col("method"), pl.col("selection_id").cast(pl.String),
        pl.col("budget").cast(pl.Float64), pl.col("seed").cast(pl.Int64), pl.col("task"),
        pl.col("metric"), pl.col("value").cast(pl.Float64)).to_arrow(),
        key=["crawl", "evaluation_id"])


@crawl_asset(
    group=GROUP, kind="torch", code_version="3",
    description="Linear datamodeling score: models with the proxy recipe trained on random "
    "subsets of the pool; Spearman over subsets of each select-split target's measured loss vs "
    "the loss the datamodel weights predict (-sum of tau over the subset, soft-thresholded as "
    "the selection's scores are), averaged per task; lds_raw: the same for raw tau.",
)
def datamodel_lds(
    context: dg.AssetExecutionContext, config: LdsConfig,
    datamodel_weights: Upstream, proxy_checkpoints: Upstream, tokenized_corpus: Upstream,
    target_tasks: Upstream,
    compute: ComputeResource, store: ArtifactStoreResource, lineage: LineageResource,
) -> dg.MaterializeResult:
    artifacts, db = store.get_store(), lineage.get_db()
    fraction = config.fraction or proxy_checkpoints.manifest["config"]["train_fraction"]
    recipe = ProxyConfig.model_validate(artifacts.read_json(proxy_checkpoints.files("config")[0]["path"]))
    made = produce(
        context, artifacts, db,
        {"num_models": config.num_models, "seeds_per_subset": config.seeds_per_subset,
         "fraction": fraction, "seed": config.seed, "model": recipe.to_dict()},
        [datamodel_weights, proxy_checkpoints, tokenized_corpus, target_tasks],
        lambda writer: _measure_lds(context, writer, config, recipe, fraction, datamodel_weights,
                                    tokenized_corpus, target_tasks, compute))
    scores = pl.from_arrow(artifacts.read_parquet(f"{made.folder}/{LDS}"))
    metrics = {"lds": "lds", "lds_task_level": "task_level", "lds_raw": "lds_raw",
               "lds_raw_task_level": "task_level_raw", "lds_one_seed": "lds_one_seed",
               "lds_noise_ceiling": "noise_ceiling"}
    rows = pl.concat([
        scores.select(pl.col("task"), pl.lit(metric).alias("metric"), pl.col(column).alias("value"))
        for metric, column in metrics.items() if column in scores.columns
    ]).with_columns(pl.lit("dsdm").alias("method"), pl.lit(None, pl.String).alias("selection_id"),
                    pl.lit(None, pl.Float64).alias("budget"), pl.lit(None, pl.Int64).alias("seed"))
    _replace_evaluations(db, made.writer, run_id(context), rows)
    return made.result({
        "lds": dg.MetadataValue.md(markdown_table(scores, float_digits=3)),
        **{f"lds_{r['task']}": float(r["lds"]) for r in scores.to_dicts()},
    })


def _measure_lds(context: dg.AssetExecutionContext, writer: AssetWriter, config: LdsConfig,
                 recipe: ProxyConfig, fraction: float, weights_up: Upstream, corpus_up: Upstream,
                 targets_up: Upstream, compute: ComputeResource) -> dict:
    """Train (or adopt) the LDS models, measure their target losses, correlate with tau
    as the selection uses it (soft-thresholded at the weights' ``soft_threshold``) and, when
    thresholded, with raw tau too; lds.parquet and lds_losses.parquet into ``writer``'s
    folder; the summary."""
    artifacts = writer.store
    threshold = float(weights_up.manifest["config"].get("soft_threshold", 0.0))
    columns = pl.from_arrow(artifacts.read_parquet(weights_up.path_of(TARGET_COLUMNS)))
    tau = np.concatenate([load_tau(artifacts, f["path"]).numpy() for f in weights_up.files("tau")])
    pool = _examples(artifacts, corpus_up)
    if tau.shape != (pool.num_rows, columns.height):
        raise dg.Failure(f"tau is {tau.shape}, expected [pool={pool.num_rows}, "
                         f"targets={columns.height}]; re-materialise datamodel_weights")
    try:
        chosen = target_columns(artifacts.read_parquet(targets_up.only("targets")["path"]),
                                columns["example_id"].to_list())
    except ValueError as error:
        raise dg.Failure(str(error)) from error
    target_ids, target_mask = to_tensors(chosen)
    subsets = proxy_subsets(pool.num_rows, config.num_models, fraction, config.seed)
    column_ids = columns["example_id"].to_list()
    precision = _precision(compute)
    runs = [(r, k) for r in range(config.seeds_per_subset) for k in range(len(subsets))]
    measured = np.empty((config.seeds_per_subset, len(subsets), len(column_ids)))
    for done, (r, k) in enumerate(runs, start=1):
        # Keyed by subset, recipe, seed and targets: a new estimator (other tau) re-uses
        # every LDS model.
        model_config = recipe.model_copy(update={"seed": config.seed + k + r * REPLICATE_SEED_STRIDE})
        examples = pool.take(pa.array(subsets[k]))
        key = model_result_key("lds_model", model_config, examples, corpus_up, targets_up,
                               precision)
        path = writer.shared_path("lds_models", key)
        data = writer.adopt_shared(path, kind="run")
        result = json.loads(data) if data is not None else None
        if result is not None and result.get("key") != key:
            raise dg.Failure(f"{path} does not hold the result it is stored under; delete it")
        if result is None or not set(column_ids) <= result["losses"].keys():
            device = compute.setup()
            model, _ = train_evaluation_model(model_config, examples, device=device,
                                              bf16=precision == "bf16")
            sums, counts = example_losses(model, target_ids, target_mask,
                                          batch_size=config.eval_batch_size, device=device)
            result = {"key": key, "examples": len(examples), "losses": dict(zip(
                column_ids, (sums / np.maximum(counts, 1)).tolist(), strict=True))}
            writer.write_shared(path, json.dumps(result).encode(), kind="run")
            context.log.info(f"LDS model {done}/{len(runs)} (subset {k}, seed {r}) done")
        else:
            context.log.info(f"LDS model {done}/{len(runs)} (subset {k}, seed {r}): reusing {path}")
        measured[r, k] = [result["losses"][e] for e in column_ids]
    # kept so that another estimate's LDS can be measured without training anything
    writer.write_parquet(LDS_LOSSES, pa.table({
        "model": np.tile(np.repeat(np.arange(len(subsets)), len(column_ids)), config.seeds_per_subset),
        "replicate": np.repeat(np.arange(config.seeds_per_subset), len(subsets) * len(column_ids)),
        "example_id": column_ids * len(runs), "loss": measured.ravel()}), kind="lds_losses")
    tasks, expected = columns["task"].to_list(), measured.mean(axis=0)
    scores = linear_datamodeling_score(tau, subsets, expected, tasks, threshold_sd=threshold)
    if threshold:
        raw = linear_datamodeling_score(tau, subsets, expected, tasks)
        scores = scores.join(raw.select("task", lds_raw="lds", task_level_raw="task_level"),
                             on="task")
    if config.seeds_per_subset > 1:
        # the one-model-per-subset LDS, comparable with such runs, and the most any estimate
        # could reach against these measurements (training noise)
        one = linear_datamodeling_score(tau, subsets, measured[0], tasks, threshold_sd=threshold)
        ceiling = pl.DataFrame({"task": tasks, "noise_ceiling": lds_ceiling(
            measured, config.seeds_per_subset)}).group_by("task").agg(pl.col("noise_ceiling").mean())
        scores = scores.join(one.select("task", lds_one_seed="lds"), on="task").join(ceiling, on="task")
    writer.write_parquet(LDS, scores.to_arrow(), kind="lds")
    return {"lds": scores.to_dicts(), "models": len(runs), "subsets": len(subsets),
            "seeds_per_subset": config.seeds_per_subset, "fraction": fraction,
            "soft_threshold": threshold}
