"""The datamodel over domains' training data: ``mixture_runs``.

R small models of the proxy recipe, each trained on ``fraction`` of the pool drawn with its
own source mixture around the pool's (`dsdm.mixture.mixture_plan`), and every target task's
select-split loss after training. ``selected_subset`` fits loss ~ mixture per task on these
runs, chooses the mixture, and ranks by DsDm within each source (`dsdm.mixture`;
docs/EVALUATION.md, "A datamodel over domains"). ``runs: 0`` skips the lever: the selection
then ranks the whole pool. One JSON record per run, written whole: a retried step adopts the
runs an interrupted attempt finished.
"""

import json
import time

import dagster as dg
import numpy as np
import polars as pl
import torch
from pydantic import Field, field_validator

from dsdm.artifacts import Upstream, mixture_run_file, read_examples
from dsdm.evaluation import HELDOUT_TEXT, target_losses
from dsdm.mixture import allocate, mixture_plan, mixture_subset
from dsdm.proxy import ProxyConfig, check_trainable, train_proxy
from dsdm.tokenization import to_tensors
from dsdm_assets.config import StepConfig
from dsdm_assets.datamodels import GROUP, ProxyModelConfig, model_for_data, refuse_model_seed
from dsdm_assets.manifests import crawl_asset
from dsdm_assets.recording import AssetWriter, produce
from dsdm_assets.tables import markdown_table
from resources import ArtifactStoreResource, ComputeResource, LineageResource

MIN_RUNS = 3


class MixtureRunsConfig(StepConfig):
    """How many mixture runs, on what share of the pool, with which recipe."""

    runs: int = Field(
        24, ge=0, le=512, description="Training runs (R), each on its own source mixture. 0 "
        "skips the datamodel over domains (selected_subset ranks the whole pool); otherwise "
        "at least 3. 24 by the bench (docs/EVALUATION.md): with 12 the per-task fits' "
        "leave-one-run-out R^2 fell to 0.18-0.86 and the chosen mixture moved a lot; 36 "
        "chose a mixture within 3 points of 24's.")
    fraction: float = Field(
        0.2, gt=0, le=1, description="Share of the pool each run trains on; the selection's "
        "own fraction is the natural choice (the mixture's effect is measured at that size).")
    concentration: float = Field(
        10.0, gt=0, description="Dirichlet concentration of the runs' mixtures around the "
        "pool's source shares: smaller spreads them further from the pool.")
    seed: int = Field(2000, ge=0, description="Seed of the mixtures and subsets; run r's model "
                      "trains with seed + r (model.seed is refused).")
    model: ProxyModelConfig = Field(
        default_factory=lambda: ProxyModelConfig(epochs=3),
        description="Each run's model and recipe (the proxies' by default, 3 passes: the "
        "evaluation models' number of passes over a selection).")

    @field_validator("runs")
    @classmethod
    def _enough_runs(cls, runs: int) -> int:
        if 0 < runs < MIN_RUNS:
            raise ValueError(f"a mixture fit needs at least {MIN_RUNS} runs (24 recommended), "
                             "or 0 to select without source quotas")
        return runs

    @field_validator("model")
    @classmethod
    def _seeded_by_runs(cls, model: ProxyModelConfig) -> ProxyModelConfig:
        return refuse_model_seed(model, "mixture_runs.seed (run r trains with seed + r)")


@crawl_asset(
    group=GROUP, kind="torch", code_version="1",
    description="Training runs of the datamodel over domains: small models on source "
    "mixtures drawn around the pool's, each with every target task's select-split loss. "
    "selected_subset fits and chooses the source quotas from them (runs: 0 skips them).",
)
def mixture_runs(
    context: dg.AssetExecutionContext,
    config: MixtureRunsConfig,
    tokenizer: Upstream,
    tokenized_corpus: Upstream,
    target_tasks: Upstream,
    compute: ComputeResource,
    store: ArtifactStoreResource,
    lineage: LineageResource,
) -> dg.MaterializeResult:
    artifacts = store.get_store()
    base = model_for_data(config.model, tokenizer, tokenized_corpus)
    settings = {"runs": config.runs, "fraction": config.fraction,
                "concentration": config.concentration, "seed": config.seed,
                "model": base.to_dict()}
    made = produce(context, artifacts, lineage.get_db(), settings,
                   [tokenizer, tokenized_corpus, target_tasks],
                   lambda writer: _train_runs(context, writer, config, base, tokenized_corpus,
                                              target_tasks, compute))
    runs = made.summary["runs"]
    if not runs:
        return made.result({"runs": 0})
    losses = pl.DataFrame([r["losses"] for r in runs])
    spread = losses.std().row(0, named=True)
    return made.result({
        "runs": len(runs),
        "loss_sd_over_runs": dg.MetadataValue.md(markdown_table(pl.DataFrame(
            {"task": list(spread), "sd": list(spread.values())}), float_digits=4)),
        "run_table": dg.MetadataValue.md(markdown_table(pl.DataFrame(
            [{"run": r["run"], **r["counts"], **r["losses"]} for r in runs]), float_digits=3)),
        "seconds_per_run": float(np.mean([r["seconds"] for r in runs])),
    })


def _train_runs(context: dg.AssetExecutionContext, writer: AssetWriter,
                config: MixtureRunsConfig, base: ProxyConfig, corpus: Upstream,
                targets_up: Upstream, compute: ComputeResource) -> dict:
    """Train the runs into ``writer``'s folder, adopting those an interrupted attempt
    finished; the summary lists every run (run, counts per source, losses per task)."""
    if config.runs == 0:
        return {"runs": [], "sources": [], "tasks": []}
    tables = list(read_examples(writer.store, corpus))
    sources = np.concatenate([t.column("source").to_numpy(zero_copy_only=False) for t in tables])
    names, available = np.unique(sources, return_counts=True)
    budget = round(config.fraction * len(sources))
    try:
        check_trainable(budget, base, f"each mixture run's share of the pool (fraction "
                        f"{config.fraction} of {len(sources)})")
    except ValueError as error:
        raise dg.Failure(f"mixture_runs: {error}") from error
    device = compute.setup()
    input_ids, loss_mask = (torch.cat(parts) for parts in zip(*map(to_tensors, tables), strict=True))
    targets = writer.store.read_parquet(targets_up.only("targets")["path"])
    plan = mixture_plan(available / available.sum(), config.runs, config.concentration, config.seed)
    runs = []
    for r, shares in enumerate(plan):
        name = mixture_run_file(r)
        if writer.has(name):
            context.log.info(f"mixture run {r}: finished earlier, reusing")
            runs.append(json.loads(writer.adopt(name, "mixture_run")))
            continue
        start = time.perf_counter()
        counts = dict(zip(names.tolist(), allocate(shares, budget, available).tolist(), strict=True))
        index = torch.from_numpy(mixture_subset(sources, counts, config.seed * 1000 + r))
        model = train_proxy(base.model_copy(update={"seed": config.seed + r}), input_ids[index],
                            loss_mask[index], device=device, log_every=10**9,
                            bf16=compute.dtype == "bfloat16" and device.type == "cuda").model
        losses = target_losses(model, targets, split="select", device=device)
        run = {"run": r, "counts": counts, "seconds": round(time.perf_counter() - start, 1),
               "losses": {t: v for t, v in zip(losses["task"], losses["loss"], strict=True)
                          if t != HELDOUT_TEXT}}
        writer.write_bytes(name, json.dumps(run).encode(), "mixture_run")
        runs.append(run)
        context.log.info(f"mixture run {r + 1}/{config.runs}: {run['seconds']:.0f} s, losses "
                         + ", ".join(f"{t} {v:.3f}" for t, v in run["losses"].items()))
    return {"runs": runs, "sources": names.tolist(), "tasks": sorted(runs[0]["losses"])}
