"""The paper's comparison at small scale: DsDm vs random, DSIR, classifier and SemDeDup.

    python bench/selection_quality.py                  # the standard configuration (hours)
    python bench/selection_quality.py --docs 1200 --seeds 0 --lds-models 4 --name quick
    python bench/selection_quality.py --threads 1 &                    # on 2 cores: the full
    python bench/selection_quality.py --threads 1 --baselines-only     # run, and beside it
                                                                       # the baselines' models
    python bench/selection_quality.py --no-out-to-loss-weight --methods dsdm random \
        --multiples 2 --lds-models 0 --name bench-5200-q-off     # one estimator lever, DsDm only
    python bench/selection_quality.py --methods dsdm random --multiples 2 --mixture-runs 0 \
        --seeds 0 --soft-threshold 0 --lds-models 8 --lds-only   # LDS models, no evaluation

The standard configuration (docs/EVALUATION.md, "The bench"): every k-th document of the
bench crawl, 5,200 documents of all ten sources (26k examples of 128 tokens), all five target
tasks mixed, 20% budget, random at 1x, 2x and 4x, two seeds.

Materialises every asset of the code location (ingest -> proxies -> datamodels -> the five
selections -> evaluation models -> LDS) on one crawl with the run config built from the
flags, in a store and DuckDB file under bench/out/selection_quality/<name>/. Re-runs reuse
every finished asset and every trained model whose inputs did not change: a run that changes
only DsDm's settings trains only DsDm's evaluation models. Writes
bench/out/selection_quality-<name>.json (losses per method x task with sd over seeds,
multipliers with whether each lies outside the random curve, LDS, the unigram reference, wall
time per asset, the run config) and the report PNG beside it, and prints the JSON. The
bench crawl is built by `make bench-corpus`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dagster as dg  # noqa: E402
import duckdb  # noqa: E402
import polars as pl  # noqa: E402

from bench.common import portable, subset_crawl  # noqa: E402
from dsdm.features import FeatureConfig  # noqa: E402
from dsdm.trak import LAMBDA_RELATIVE  # noqa: E402
from dsdm_assets import evaluation as evaluation_assets  # noqa: E402
from dsdm_assets import mixtures, selection  # noqa: E402
from dsdm_assets.datamodels import DatamodelConfig  # noqa: E402
from dsdm_assets.definitions import ASSETS  # noqa: E402
from dsdm_assets.partitions import crawl_partitions  # noqa: E402
from resources import (  # noqa: E402
    ArtifactStoreResource,
    ComputeResource,
    CrawlSourceResource,
    LineageResource,
)

OUT = REPO / "bench" / "out"
FEATURES = FeatureConfig()  # the pipeline's feature defaults
BENCH_TASKS = ("wiki_qa", "lambada_cloze", "tech_faq", "mixed_cloze", "mixed_continuation")
BASELINE_METHODS = [m for m in selection.SELECTION_ASSETS if m != "dsdm"]


def run_config(args: argparse.Namespace) -> dict:
    proxy = {"hidden_size": args.proxy_hidden, "num_layers": args.proxy_layers, "num_heads": 4,
             "epochs": args.proxy_epochs}
    features = {"target_dim": args.target_dim, "sketch": args.sketch, "factor_dim": args.factor_dim,
                "include_lm_head": args.lm_head, "include_embeddings": args.embeddings}
    evaluation = {"hidden_size": args.eval_hidden, "num_layers": args.eval_layers, "num_heads": 4,
                  "epochs": args.eval_epochs}
    return {"ops": {
        "tokenizer": {"config": {"vocab_size": args.vocab}},
        "target_tasks": {"config": {"tasks": args.tasks_list}},
        "proxy_checkpoints": {"config": {"num_proxies": args.proxies, "model": proxy}},
        # the projection of candidates and targets alike (target_gradients takes it from here)
        "gradient_shards": {"config": features},
        "datamodel_weights": {"config": {"lambda_relative": args.lambda_relative,
                                         "out_to_loss_weight": args.out_to_loss_weight,
                                         "soft_threshold": args.soft_threshold}},
        # the datamodel over domains: runs of the proxy architecture, fraction as selected
        "mixture_runs": {"config": {"runs": args.mixture_runs, "fraction": args.fraction,
                                    "model": {**proxy, "epochs": args.eval_epochs}}},
        "selected_subset": {"config": {"fraction": args.fraction,
                                       "standardise_tasks": args.standardise,
                                       "task_mixing": args.task_mixing,
                                       "mixture_objective": args.mixture_objective}},
        **{asset: {"config": {"fraction": args.fraction}} for asset in (
            "random_subset", "dsir_subset", "classifier_subset", "semdedup_subset")},
        "evaluations": {"config": {"seeds": args.seeds, "random_multiples": args.multiples,
                                   "model": evaluation}},
        "datamodel_lds": {"config": {"num_models": args.lds_models,
                                     "seeds_per_subset": args.lds_seeds}},
    }}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crawl", type=Path, default=REPO / ".dsdm" / "bench" / "crawls" / "bench")
    parser.add_argument("--tasks", type=Path, default=REPO / ".dsdm" / "bench" / "tasks")
    parser.add_argument("--docs", type=int, default=5200, help="every k-th document, N in all "
                        "(0: the whole crawl)")
    parser.add_argument("--tasks-list", nargs="+", default=list(BENCH_TASKS),
                        help="target tasks, mixed in one selection")
    parser.add_argument("--name", default=None, help="run name (default: bench-<docs>)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--proxies", type=int, default=8)
    parser.add_argument("--proxy-hidden", type=int, default=128)
    parser.add_argument("--proxy-layers", type=int, default=2)
    parser.add_argument("--proxy-epochs", type=int, default=1)
    parser.add_argument("--target-dim", type=int, default=FEATURES.target_dim)
    parser.add_argument("--sketch", choices=("countsketch", "none"), default="countsketch")
    parser.add_argument("--factor-dim", type=int, default=FEATURES.factor_dim)
    parser.add_argument("--lm-head", action=argparse.BooleanOptionalAction,
                        default=FEATURES.include_lm_head)
    parser.add_argument("--embeddings", action=argparse.BooleanOptionalAction,
                        default=FEATURES.include_embeddings)
    parser.add_argument("--standardise", action=argparse.BooleanOptionalAction, default=True,
                        help="standardise each task's scores before mixing (selected_subset)")
    parser.add_argument("--task-mixing", choices=("sum", "max"),
                        default=selection.SelectionConfig.model_fields["task_mixing"].default,
                        help="how selected_subset mixes the task scores")
    parser.add_argument("--mixture-runs", type=int,
                        default=mixtures.MixtureRunsConfig.model_fields["runs"].default,
                        help="training runs of the datamodel over domains (0: rank the whole pool)")
    parser.add_argument("--mixture-objective", choices=("mean", "worst", "per_task"),
                        default=selection.SelectionConfig.model_fields["mixture_objective"].default,
                        help="how selected_subset chooses the source mixture from those runs")
    parser.add_argument("--lambda-relative", type=float, default=LAMBDA_RELATIVE)
    parser.add_argument("--out-to-loss-weight", action=argparse.BooleanOptionalAction,
                        default=DatamodelConfig.model_fields["out_to_loss_weight"].default,
                        help="weight each candidate's scores by its out-to-loss weight q")
    parser.add_argument("--soft-threshold", type=float,
                        default=DatamodelConfig.model_fields["soft_threshold"].default,
                        help="per-target soft threshold of tau, in sd over the pool (0: none)")
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--eval-hidden", type=int, default=160)
    parser.add_argument("--eval-layers", type=int, default=3)
    parser.add_argument("--eval-epochs", type=int, default=3,
                        help="passes over each selection (random at kx the budget: k x the steps)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--multiples", type=float, nargs="+", default=[2.0, 4.0])
    parser.add_argument("--lds-models", type=int, default=16,
                        help="subsets of the LDS (0: no datamodel_lds, no LDS in the JSON)")
    parser.add_argument("--lds-seeds", type=int,
                        default=evaluation_assets.LdsConfig.model_fields["seeds_per_subset"].default,
                        help="models per LDS subset, each its own seed (the LDS uses their mean loss)")
    parser.add_argument("--methods", nargs="+", default=list(selection.SELECTION_ASSETS),
                        choices=list(selection.SELECTION_ASSETS),
                        help="selections made and evaluated (random is required: the "
                        "multipliers are measured against it)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--lds-only", action="store_true",
                        help="only the datamodel and its LDS models (datamodel_lds), no evaluation "
                        "models: for bench/tau_variants.py --lds on a store built without them")
    parser.add_argument("--baselines-only", action="store_true",
                        help="only the baselines' selections and their evaluation models (the "
                        "random curve included), for a second process beside the full run: its "
                        "models are stored where the full run's evaluations adopt them")
    args = parser.parse_args()

    args.docs = args.docs or None
    assets, methods = asset_selection(args)
    name = args.name or f"bench-{args.docs or 'all'}"
    folder = OUT / "selection_quality" / name
    crawl = subset_crawl(args.crawl, args.docs, folder / "crawls" / name)
    resources = {
        "store": ArtifactStoreResource(root_url=str(folder / "store")),
        "crawls": CrawlSourceResource(root_url=str(crawl.parent), tasks_url=str(args.tasks)),
        "lineage": LineageResource(database=str(folder / "lineage.duckdb")),
        "compute": ComputeResource(device="auto", threads=args.threads),
    }
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(crawl_partitions.name, [name])
    config = run_config(args)
    if assets is not None:  # a partial run: its methods, and config for its assets only
        config["ops"]["evaluations"]["config"]["methods"] = methods
        config["ops"] = {op: c for op, c in config["ops"].items() if op in assets}
    start = time.perf_counter()
    result = dg.materialize(ASSETS, partition_key=name, instance=instance, resources=resources,
                            run_config=config, selection=assets)
    wall = time.perf_counter() - start
    if not result.success:
        raise SystemExit("the run failed; see the log above")
    if args.baselines_only:
        print(f"baselines' evaluation models stored in {wall:.0f} s; the full run adopts them")
        return
    if args.lds_only:
        lds = {e.step_materialization_data.materialization.asset_key.to_user_string():
               e.step_materialization_data.materialization.metadata
               for e in result.get_asset_materialization_events()}["datamodel_lds"]
        print(f"datamodel_lds {lds['config_hash'].value} in {wall:.0f} s:\n{lds['lds'].value}")
        return
    print(json.dumps(summary(result, folder, name, args, config, wall), indent=2))


def asset_selection(args: argparse.Namespace) -> tuple[list[str] | None, list[str]]:
    """(the assets this run materialises, None for all of them; the methods it evaluates)."""
    methods, lds_models = args.methods, args.lds_models
    if args.baselines_only:
        if lds_models == 0 or set(methods) != set(selection.SELECTION_ASSETS):
            raise SystemExit("--baselines-only chooses its own assets; leave --methods and "
                             "--lds-models at their defaults")
        # the baselines' selections and evaluations (SemDeDup embeds with the proxies)
        methods, lds_models = BASELINE_METHODS, 0
    if args.lds_only:
        if lds_models == 0 or "dsdm" not in methods:
            raise SystemExit("--lds-only measures DsDm's datamodel: keep dsdm in --methods and "
                             "--lds-models above 0")
        methods = ["dsdm", "random"]
    if "random" not in methods:
        raise SystemExit("--methods must include random: the multipliers are measured against it")
    left_out = {selection.SELECTION_ASSETS[m] for m in selection.SELECTION_ASSETS
                if m not in methods}
    if lds_models == 0:
        left_out.add("datamodel_lds")
    if "dsdm" not in methods:  # what only DsDm's selection (and the LDS) reads
        left_out.add("mixture_runs")
        if lds_models == 0:
            left_out |= {"gradient_shards", "target_gradients", "datamodel_weights"}
    if args.lds_only:  # the selections stay (cheap); no model is trained on them
        left_out.add("evaluations")
    if not left_out:
        return None, methods
    keys = [key.to_user_string() for asset in ASSETS for key in asset.keys]
    return [key for key in keys if key not in left_out], methods


def summary(result, folder: Path, name: str, args: argparse.Namespace, config: dict,
            wall: float) -> dict:
    meta = {}
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        meta[materialization.asset_key.to_user_string()] = {
            k: v.value for k, v in materialization.metadata.items()}
    # this run's rows only: the table also keeps earlier evaluations of the crawl (another
    # configuration, or a --baselines-only run's subset of the methods)
    evaluation = meta["evaluations"]["config_hash"]
    lds_id = meta.get("datamodel_lds", {}).get("config_hash")  # None: a run without LDS
    con = duckdb.connect(str(folder / "lineage.duckdb"), read_only=True)
    losses = con.execute("""
        SELECT method, task, avg(value), coalesce(stddev_pop(value), 0), count(*)
        FROM evaluations WHERE metric = 'loss' AND crawl = ? AND evaluation_id = ?
        GROUP BY 1, 2 ORDER BY 2, 1""", [name, evaluation]).fetchall()
    lds = con.execute("SELECT task, metric, value FROM evaluations WHERE metric LIKE 'lds%' "
                      "AND crawl = ? AND evaluation_id = ? ORDER BY 1, 2", [name, lds_id]).fetchall()
    unigram = con.execute("SELECT task, metric, value FROM evaluations WHERE method = 'unigram' "
                          "AND crawl = ? AND evaluation_id = ? ORDER BY 1",
                          [name, evaluation]).fetchall()
    durations = {}
    for event in result.all_events:
        if event.is_step_success:
            durations[event.step_key] = round(event.event_specific_data.duration_ms / 1000, 1)
    png = Path(meta["evaluations"]["plot"].removeprefix("file://"))
    # Beside the plot: the multipliers with their 'outside the random curve' flag.
    mults = pl.read_parquet(png.parent / "multipliers.parquet").sort("task", "method")
    plot = OUT / f"selection_quality-{name}.png"
    shutil.copyfile(png, plot)
    report = {
        "crawl": name, "documents": args.docs or "all",
        "examples": meta["tokenized_corpus"]["examples"],
        "selected_per_method": meta.get("selected_subset", {}).get("selected"),
        "flags": {k: portable(v) for k, v in vars(args).items()},
        "loss": [{"method": m, "task": t, "mean": round(v, 4), "sd": round(s, 4), "seeds": n}
                 for m, t, v, s, n in losses],
        "multiplier": [{"method": r["method"], "task": r["task"], "value": round(r["multiplier"], 3),
                        "extrapolated": r["extrapolated"]} for r in mults.iter_rows(named=True)],
        "lds": [{"task": t, "metric": k, "value": round(v, 3)} for t, k, v in lds],
        "unigram": [{"task": t, "metric": k, "value": round(v, 4)} for t, k, v in unigram],
        "run_config": config,
        "report_markdown": meta["evaluations"]["report"],
        "wall_s": round(wall, 1), "step_seconds": durations,
        "plot": str(plot.relative_to(REPO)),
    }
    path = OUT / f"selection_quality-{name}.json"
    path.write_text(json.dumps(report, indent=2))
    report["json"] = str(path.relative_to(REPO))
    return report


if __name__ == "__main__":
    main()
