"""Datamodels group: proxy models -> projected gradients -> TRAK datamodel weights.

Each asset is resumable: files are written atomically one proxy / shard at a time into the
asset's content-derived folder, and an interrupted run's finished files are adopted on retry.
``gradient_shards`` is a graph of ops, one step per (proxy, corpus shard), so an executor
with several processes (or pods) featurises shards side by side; ``target_gradients`` holds
the target features apart, so new target tasks do not recompute the candidates.
"""

import json
import time
import warnings
from collections.abc import Iterator

import dagster as dg
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from pydantic import Field
from safetensors.torch import save as safetensors_save

from dsdm.artifacts import (
    CHECKPOINT,
    CONTRIBUTIONS,
    LOSSES,
    MANIFEST,
    PROXY_CONFIG,
    PROXY_FILES,
    SCORES,
    SUBSET,
    TARGET_COLUMNS,
    TARGET_TEXT,
    Upstream,
    checkpoint_paths,
    feature_shard,
    features_header,
    load_features,
    load_proxy_checkpoint,
    load_tau,
    load_tokenizer,
    proxy_file,
    read_examples,
    target_features,
    tau_shard,
)
from dsdm.datamodels import (
    example_ids_digest,
    feature_header,
    feature_stats,
    featurise_table,
    pool_positions,
    proxy_subsets,
    round_subsets,
)
from dsdm.explain import target_text
from dsdm.features import FeatureConfig
from dsdm.lineage import LineageDB
from dsdm.proxy import (
    ProxyConfig,
    check_trainable,
    fit_to_data,
    loss_summary,
    proxy_to_bytes,
    train_proxy,
)
from dsdm.scoring import STORED_CONTRIBUTION_SCHEMA, score_pool, soft_thresholded_means
from dsdm.store import StoredArtifact
from dsdm.tokenization import to_tensors
from dsdm.trak import LAMBDA_RELATIVE, SOFT_THRESHOLD
from dsdm_assets.config import StepConfig
from dsdm_assets.jobs import CPU_STEP_TAGS, STEP_RETRY_POLICY, TORCH_STEP_TAGS
from dsdm_assets.manifests import MANIFEST_IO, UPSTREAM, crawl_asset, manifest_io_manager
from dsdm_assets.partitions import crawl_partitions
from dsdm_assets.recording import (
    AssetWriter,
    RecordedSelection,
    adopt_file,
    produce,
    read_recorded,
    read_selection,
    record_rows,
    require_made_from,
    run_id,
)
from dsdm_assets.tables import markdown_table
from resources import ArtifactStoreResource, ComputeResource, LineageResource
from resources.storage import step_json_io_manager, step_values_folder

GROUP = "datamodels"
# 2: target features moved to target_gradients; 3: speed-only settings out of the fingerprint
GRADIENTS_VERSION = "3"
# 2: select-split targets only; 3: the projection comes from gradient_shards
TARGET_GRADIENTS_VERSION = "3"
STEP_IO = "step_json_io"


def model_for_data(model: ProxyConfig, tokenizer: Upstream, corpus: Upstream) -> ProxyConfig:
    """A model config completed with the vocabulary size and sequence length of the data;
    a value the user set that contradicts the data fails the step."""
    try:
        return fit_to_data(model, tokenizer.manifest["summary"]["vocab_size"],
                           corpus.manifest["summary"]["seq_len"])
    except ValueError as error:
        raise dg.Failure(str(error)) from error


class ProxyModelConfig(StepConfig, ProxyConfig):
    """Proxy architecture and training recipe. vocab_size and seq_len come from the
    tokenizer and corpus; setting them to anything else is an error."""


def refuse_model_seed(model: ProxyConfig, seeds_from: str) -> ProxyConfig:
    """``model`` as given, or an error when it sets a seed that a step replaces with its own
    (``seeds_from`` names the key that seeds its models), so the setting cannot look used."""
    if model.seed != ProxyConfig.model_fields["seed"].default:
        raise ValueError(f"model.seed is not used by this step: its models are seeded by "
                         f"{seeds_from}; set that instead")
    return model


class ProxyEnsembleConfig(StepConfig):
    """How many proxies, and on what share of the pool each is trained."""

    num_proxies: int = Field(
        8, ge=1, le=64, description="Proxies in the ensemble (M). 8 by the bench's ablations "
        "(docs/EVALUATION.md): LDS and every task's loss improve up to 8; 16 buys no loss.")
    train_fraction: float = Field(
        0.5, gt=0, le=1, description="Share of the pool each proxy trains on (random, seeded)."
    )
    model: ProxyModelConfig = Field(default_factory=ProxyModelConfig)
    previous_selection: str = Field(
        "", pattern=r"^([0-9a-f]{16})?$",
        description="A selection_id of this crawl (the previous round's selection, any method): "
        "each proxy then trains on that selection plus a seeded random sample of the rest of the "
        "pool, train_fraction of the pool in all (dsdm.datamodels.round_subsets). `dsdm rounds` "
        "sets it; empty: a seeded random train_fraction of the pool (the first round).",
    )


class GradientConfig(StepConfig, FeatureConfig):
    """Projected per-example gradients: method, projection and dimension. Declared once, on
    gradient_shards: target_gradients featurises the targets with the same settings."""


class TargetGradientConfig(StepConfig):
    """target_gradients takes its projection from gradient_shards' manifest, so candidate and
    target features cannot differ; only settings that leave the features unchanged are here."""

    batch_size: int = Field(
        FeatureConfig.model_fields["batch_size"].default, gt=0,
        description="Target examples per forward/backward (speed and memory only; not part "
        "of the fingerprint).",
    )


class DatamodelConfig(StepConfig):
    """TRAK estimator settings."""

    lambda_relative: float = Field(
        LAMBDA_RELATIVE, gt=0, description="Ridge lambda as a multiple of the kernel's mean diagonal."
    )
    out_to_loss_weight: bool = Field(
        True, description="Multiply each candidate's scores by its mean out-to-loss weight "
        "q = mean over its tokens of (1 - p) under the proxies (TRAK's Q), which is larger for "
        "text the proxies predict badly; false ranks by the proxies' mean score alone.",
    )
    soft_threshold: float = Field(
        SOFT_THRESHOLD, ge=0, le=10, description="TRAK's sparsification, in standard "
        "deviations: before a task's mean over its targets, each target's scores within this "
        "many of its standard deviations over the pool become 0 and the rest shrink towards 0 "
        "by as much, so a candidate's task score counts only the effects that stand out from "
        "that target's noise. 0 keeps the raw scores. The stored tau and the explanations keep "
        "the raw estimate; datamodel_lds measures the thresholded one (and raw tau beside it).",
    )
    explain_targets: int = Field(
        3, ge=0, le=100, description="Per candidate, how many target examples it helps most "
        "(largest tau) and hurts most (most negative) to keep for `dsdm explain` and the "
        "explained_targets view; 0 keeps none.",
    )


@crawl_asset(
    group=GROUP, kind="torch", code_version="1",
    check_specs=[dg.AssetCheckSpec("loss_fell", asset="proxy_checkpoints", blocking=True,
                                   description="Every proxy's late training loss is below its early loss.")],
    description="M small GPT-NeoX proxies, each trained on its own seeded random fraction of "
    "the tokenized pool; safetensors + JSON config + the example ids each saw.",
)
def proxy_checkpoints(
    context: dg.AssetExecutionContext,
    config: ProxyEnsembleConfig,
    tokenizer: Upstream,
    tokenized_corpus: Upstream,
    compute: ComputeResource,
    store: ArtifactStoreResource,
    lineage: LineageResource,
) -> dg.MaterializeResult:
    artifacts, db = store.get_store(), lineage.get_db()
    base = model_for_data(config.model, tokenizer, tokenized_corpus)
    settings = {"num_proxies": config.num_proxies, "train_fraction": config.train_fraction,
                "model": base.to_dict()}
    inputs: list = [tokenizer, tokenized_corpus]
    previous = None
    if config.previous_selection:  # a later round: made from (and lineage to) that selection
        previous = read_selection(artifacts, db, context.partition_key, config.previous_selection)
        settings["previous_selection"] = previous.selection_id
        inputs.append((previous.uri, previous.sha256))
    made = produce(context, artifacts, db, settings, inputs, lambda writer: _train_proxies(
        context, writer, config, base, tokenized_corpus, previous, compute))
    proxies = made.summary["proxies"]
    table = pl.DataFrame([{k: v for k, v in p.items() if k != "curve"} for p in proxies])
    return made.result({
        "proxies": dg.MetadataValue.md(markdown_table(table)),
        "final_loss_mean": float(np.mean([p["last_loss"] for p in proxies])),
        "loss_curve_proxy_0": dg.MetadataValue.json(proxies[0]["curve"]),
        "previous_selection": made.summary.get("previous_selection", ""),
    }, [dg.AssetCheckResult(
        check_name="loss_fell", passed=all(p["last_loss"] < p["first_loss"] for p in proxies),
        metadata={"first_vs_last": dg.MetadataValue.md(markdown_table(
            table.select("proxy", "first_loss", "last_loss")))},
    )])


def _train_proxies(context: dg.AssetExecutionContext, writer: AssetWriter,
                   config: ProxyEnsembleConfig, base: ProxyConfig, corpus: Upstream,
                   previous: RecordedSelection | None, compute: ComputeResource) -> dict:
    """Train the proxies into ``writer``'s folder, adopting those an interrupted attempt
    finished (`PROXY_FILES`, the losses last); the summary of their loss curves."""
    device = compute.setup()
    tables = list(read_examples(writer.store, corpus))
    example_ids = pa.concat_arrays([t.column("example_id").combine_chunks() for t in tables])
    input_ids, loss_mask = (torch.cat(parts) for parts in zip(*map(to_tensors, tables), strict=True))
    if previous is None:
        subsets = proxy_subsets(len(input_ids), config.num_proxies, config.train_fraction, base.seed)
    else:
        try:
            chosen = pool_positions(example_ids.to_pylist(), previous.example_ids)
        except ValueError as error:
            raise dg.Failure(f"previous_selection {previous.selection_id!r}: {error}") from error
        subsets = round_subsets(len(input_ids), config.num_proxies, config.train_fraction,
                                base.seed, chosen)
    try:
        check_trainable(min(map(len, subsets)), base, f"each proxy's share of the pool "
                        f"(train_fraction {config.train_fraction} of {len(input_ids)})")
    except ValueError as error:
        raise dg.Failure(f"proxy_checkpoints: {error}") from error
    proxies, lenders = [], _proxy_lenders(writer)
    for m, subset in enumerate(subsets):
        if all(writer.has(proxy_file(m, name)) for name in PROXY_FILES):
            context.log.info(f"proxy {m}: finished earlier, reusing")
            losses = json.loads(writer.adopt(proxy_file(m, LOSSES), "losses"))
            for name, kind in PROXY_FILES.items():
                if name != LOSSES:
                    writer.adopt(proxy_file(m, name), kind)
        elif (lent := _lent_proxy(writer, lenders, m, example_ids.take(pa.array(subset)))):
            context.log.info(f"proxy {m}: the same recipe and examples as in {lent[0]}: copied")
            losses = lent[1]
        else:
            losses = _train_proxy(context, writer, m, base.model_copy(update={"seed": base.seed + m}),
                                  input_ids, loss_mask, example_ids, subset, compute, device)
        curve = losses["losses"]
        proxies.append({"proxy": m, "examples": losses["examples"], **loss_summary(curve),
                        "seconds": round(losses["seconds"], 1), "curve": curve[::max(1, len(curve) // 50)]})
    return {"proxies": proxies, "pool_examples": len(input_ids),
            **({"previous_selection": previous.selection_id,
                "previous_selected": len(previous.example_ids)} if previous else {})}


def _proxy_lenders(writer: AssetWriter) -> list[dict]:
    """Finished proxy_checkpoints folders of this crawl and inputs whose settings differ from
    this one's at most in ``num_proxies``. Proxy m's recipe (seed base + m) and examples do
    not depend on the ensemble's size, so a larger ensemble copies what a smaller one
    trained instead of training it again (`_lent_proxy` checks the examples)."""
    def rest(settings: dict) -> str:
        return json.dumps({k: v for k, v in settings.items() if k != "num_proxies"}, sort_keys=True)

    inputs = sorted(map(list, writer.inputs))
    return [manifest for manifest in writer.lenders()
            if rest(manifest["config"]) == rest(writer.config)
            and sorted([i["uri"], i["sha256"]] for i in manifest["inputs"]) == inputs]


def _lent_proxy(writer: AssetWriter, lenders: list[dict], m: int,
                examples: pa.Array) -> tuple[str, dict] | None:
    """Proxy m's files copied into ``writer``'s folder from the first lender that trained it
    on exactly ``examples`` and whose files are all still the recorded ones (adopted; the
    losses written last, as training does): (the lender's folder, the losses). None when no
    lender has it."""
    for manifest in lenders:
        entries = {f["name"]: f for f in manifest["files"]}
        wanted = [entries.get(proxy_file(m, name)) for name in PROXY_FILES]
        if None in wanted:
            continue
        # the examples first: a lender that trained proxy m on others costs no checkpoint read
        subset = read_recorded(writer.store, entries[proxy_file(m, SUBSET)])
        if subset is None or not pq.read_table(pa.BufferReader(subset), columns=["example_id"]) \
                .column(0).combine_chunks().equals(examples):
            continue
        data = [subset if name == SUBSET else read_recorded(writer.store, entry)
                for name, entry in zip(PROXY_FILES, wanted, strict=True)]
        if None in data:
            continue
        for (name, kind), content in zip(PROXY_FILES.items(), data, strict=True):
            writer.write_copied(proxy_file(m, name), content, kind)
        return wanted[0]["path"].rsplit("/", 2)[0], json.loads(data[-1])
    return None


def _train_proxy(context: dg.AssetExecutionContext, writer: AssetWriter, m: int,
                 proxy_config: ProxyConfig, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                 example_ids: pa.Array, subset: np.ndarray, compute: ComputeResource,
                 device: torch.device) -> dict:
    """Train proxy m on the pool rows ``subset`` and write its files, the losses last."""
    context.log.info(f"proxy {m}: training on {len(subset)} examples")
    start = time.perf_counter()
    index = torch.from_numpy(subset)
    result = train_proxy(
        proxy_config, input_ids[index], loss_mask[index], device=device,
        bf16=compute.dtype == "bfloat16" and device.type == "cuda", log_every=25,
        callback=lambda p: context.log.info(f"proxy {m} step {p.step}/{p.total_steps} loss "
                                            f"{p.loss:.3f} tokens/s {p.tokens_per_s:.0f}"))
    losses = {"losses": result.losses, "seconds": time.perf_counter() - start,
              "examples": len(subset)}
    kinds = PROXY_FILES
    writer.write_bytes(proxy_file(m, CHECKPOINT), proxy_to_bytes(result.model), kinds[CHECKPOINT])
    writer.write_bytes(proxy_file(m, PROXY_CONFIG), json.dumps(proxy_config.to_dict(), indent=2).encode(),
                       kinds[PROXY_CONFIG])
    writer.write_parquet(proxy_file(m, SUBSET), pa.table(
        {"example_id": example_ids.take(pa.array(subset))}), kinds[SUBSET])
    # Written last: its presence marks this proxy finished.
    writer.write_bytes(proxy_file(m, LOSSES), json.dumps(losses).encode(), kinds[LOSSES])
    return losses


def _lenders_per_proxy(writer: AssetWriter, proxies: Upstream,
                       shared: list[Upstream]) -> dict[int, dict[str, dict]]:
    """Proxy m -> {file name: manifest entry} of a finished folder of ``writer``'s asset made
    with the same config from the same ``shared`` inputs and from an ensemble whose proxy m
    has this proxy m's checkpoint bytes (e.g. a smaller ensemble): its proxy-m files are what
    this folder would compute (proxy m projects with seed + m). A lender whose
    proxy_checkpoints manifest is not the one it recorded is skipped."""
    ours = [f["sha256"] for f in proxies.files("checkpoint")]
    needed = [{"uri": u.uri, "sha256": u.sha256} for u in shared]
    found: dict[int, dict[str, dict]] = {}
    for manifest in writer.lenders():
        others = [i for i in manifest["inputs"] if i not in needed]
        if manifest["config"] != writer.config or len(others) != 1:
            continue
        (recorded,) = others
        data = read_recorded(writer.store, {"path": writer.store.relpath(recorded["uri"]),
                                            "sha256": recorded["sha256"]})
        lent_proxies = json.loads(data) if data is not None else {}
        if lent_proxies.get("asset") != "proxy_checkpoints":
            continue
        theirs = [f["sha256"] for f in lent_proxies["files"] if f["kind"] == "checkpoint"]
        for m, (sha, lent) in enumerate(zip(ours, theirs, strict=False)):
            prefix = f"proxy-{m:02d}/"
            if m not in found and sha == lent:
                found[m] = {f["name"]: f for f in manifest["files"] if f["name"].startswith(prefix)}
    return found


def _features_finite_check(summary: dict, **key) -> dg.AssetCheckResult:
    """features_finite: no NaN/inf value and no degenerate (constant) feature file."""
    degenerate = summary.get("degenerate_files", [])  # manifests before this check: none
    return dg.AssetCheckResult(
        check_name="features_finite", passed=summary["nonfinite"] == 0 and not degenerate,
        metadata={"nonfinite_values": summary["nonfinite"],
                  "degenerate_files": dg.MetadataValue.json(degenerate[:20])}, **key)


def _rate(rows: int, seconds: float) -> float | None:
    return rows / seconds if seconds else None


def _feature_metadata(summary: dict, files: int, reused: bool) -> dict:
    """This run's view: a reused folder computed nothing and reused every file."""
    counts = {"files_computed": 0, "files_reused": files} if reused else {
        "files_computed": summary["files_computed"], "files_reused": summary["files_reused"]}
    return {**{k: v for k, v in summary.items() if v is not None and k not in counts}, **counts}


@dg.op(
    tags=CPU_STEP_TAGS, retry_policy=STEP_RETRY_POLICY,
    out={"plan": dg.Out(dict, io_manager_key=STEP_IO),
         "work": dg.DynamicOut(dict, io_manager_key=STEP_IO)},
    description="Finds the gradient_shards folder for these inputs and lists the (proxy, "
    "shard) files still to make; nothing when a complete folder exists.",
)
def plan_gradient_shards(context: dg.OpExecutionContext, config: GradientConfig,
                         proxy_checkpoints: Upstream, tokenized_corpus: Upstream,
                         store: ArtifactStoreResource, lineage: LineageResource):
    require_made_from(proxy_checkpoints, "proxy_checkpoints", tokenized_corpus, "tokenized_corpus")
    writer = AssetWriter(context, store.get_store(), lineage.get_db(), config.identity(),
                         [proxy_checkpoints, tokenized_corpus])
    reused = writer.existing() is not None
    writer.release()  # the featurise steps run elsewhere; collect claims the folder again
    checkpoints = checkpoint_paths(proxy_checkpoints)
    shards = [f["path"] for f in tokenized_corpus.files("examples")]
    yield dg.Output({"config": config.identity(), "inputs": writer.inputs,
                     "folder": writer.folder, "reused": reused, "replaced": writer.replaced,
                     "proxies": len(checkpoints), "shards": len(shards),
                     "proxy_checkpoints_sha256": proxy_checkpoints.sha256}, "plan")
    if reused:
        context.log.info(f"gradient_shards for these inputs complete in {writer.folder}: reusing")
        return
    lenders = _lenders_per_proxy(writer, proxy_checkpoints, [tokenized_corpus])
    for m, checkpoint in enumerate(checkpoints):
        for k, source in enumerate(shards):
            name = feature_shard(m, k)
            yield dg.DynamicOutput(
                {"folder": writer.folder, "name": name, "proxy": m, "checkpoint": checkpoint,
                 "source": source, "config": config.model_dump(),
                 "lent": lenders.get(m, {}).get(name)},
                mapping_key=f"proxy_{m:02d}_shard_{k:05d}", output_name="work")


@dg.op(out=dg.Out(dict, io_manager_key=STEP_IO), tags=TORCH_STEP_TAGS,
       retry_policy=STEP_RETRY_POLICY,
       description="Featurises one corpus shard under one proxy, or adopts the file an "
       "interrupted attempt finished; each file is written atomically.")
def featurise_gradient_shard(context: dg.OpExecutionContext, work: dict,
                             compute: ComputeResource, store: ArtifactStoreResource) -> dict:
    artifacts = store.get_store()
    path = f"{work['folder']}/{work['name']}"
    if artifacts.exists(path):
        data, stored = adopt_file(artifacts, path)
        rows, seconds, computed = int(feature_header(data, stored.uri)["rows"]), 0.0, False
        context.log.info(f"{work['name']}: finished by an earlier attempt, adopting")
    elif work.get("lent") and (lent := read_recorded(artifacts, work["lent"])):
        data, stored = lent, artifacts.write_bytes(path, lent)
        rows, seconds, computed = int(feature_header(data, stored.uri)["rows"]), 0.0, False
        context.log.info(f"{work['name']}: the same proxy's features in {work['lent']['path']}: copied")
    else:
        device = compute.setup()
        model = load_proxy_checkpoint(artifacts, work["checkpoint"], device)
        table = artifacts.read_parquet(work["source"])
        data, seconds = featurise_table(model, table, FeatureConfig.model_validate(work["config"]),
                                        work["proxy"], work["source"], device)
        stored = artifacts.write_bytes(path, data)
        rows, computed = table.num_rows, True
        context.log.info(f"{work['name']}: {rows} examples, {rows / max(seconds, 1e-9):.1f} "
                         "examples/s")
    nonfinite, dim, degenerate = feature_stats(data, stored.uri)
    return {"name": work["name"], "uri": stored.uri, "sha256": stored.sha256,
            "size_bytes": stored.size_bytes, "rows": rows, "computed": computed,
            "seconds": seconds, "nonfinite": nonfinite, "dim": dim, "degenerate": degenerate}


@dg.op(
    tags=CPU_STEP_TAGS, retry_policy=STEP_RETRY_POLICY,
    out={"result": dg.Out(UPSTREAM, io_manager_key=MANIFEST_IO),
         "features_finite": dg.Out(dg.Nothing)},
    description="Writes the gradient_shards manifest from every file's result (or records "
    "the reused folder), the lineage rows, and the features_finite check.",
)
def collect_gradient_shards(context: dg.OpExecutionContext, plan: dict, results: list[dict],
                            store: ArtifactStoreResource, lineage: LineageResource):
    artifacts = store.get_store()

    def collect(writer: AssetWriter) -> dict:
        if writer.folder != plan["folder"]:
            raise dg.Failure(f"planned folder {plan['folder']} differs from {writer.folder}; a bug")
        writer.replaced = plan["replaced"]
        ordered = sorted(results, key=lambda r: r["name"])
        if len(ordered) != plan["proxies"] * plan["shards"]:
            raise dg.Failure(f"{len(ordered)} feature files for {plan['proxies']} proxies x "
                             f"{plan['shards']} shards")
        for r in ordered:
            writer.written.append((r["name"], StoredArtifact(r["uri"], r["sha256"], r["size_bytes"]),
                                   r["rows"], "features", not r["computed"]))
        done = [r for r in ordered if r["computed"]]
        return {"proxies": plan["proxies"], "shards": plan["shards"], "dim": ordered[0]["dim"],
                "nonfinite": sum(r["nonfinite"] for r in ordered),
                "degenerate_files": [r["name"] for r in ordered if r["degenerate"]],
                "files_computed": len(done), "files_reused": len(ordered) - len(done),
                "examples_per_s": _rate(sum(r["rows"] for r in done), sum(r["seconds"] for r in done)),
                "proxy_checkpoints_sha256": plan["proxy_checkpoints_sha256"]}

    # a folder the plan step verified is not read again (another run may also have finished
    # it meanwhile: then produce finds and verifies it)
    verified = artifacts.read_json(f"{plan['folder']}/{MANIFEST}") if plan["reused"] else None
    made = produce(context, artifacts, lineage.get_db(), plan["config"], plan["inputs"], collect,
                   verified=verified)
    # The values the graph's steps handed each other are spent once the manifest exists (a
    # re-execution from failure never re-runs a succeeded collect), so they do not pile up.
    removed = artifacts.remove_folder(step_values_folder(run_id(context)))
    context.log.info(f"removed {removed} step values of this run from the store")
    yield dg.Output(made.writer.output(), "result", data_version=made.writer.data_version,
                    metadata=made.metadata(_feature_metadata(made.summary, len(made.manifest["files"]),
                                                             made.reused)))
    yield _features_finite_check(made.summary, asset_key="gradient_shards")


@dg.config_mapping
def _gradient_shards_config(config: GradientConfig) -> dict:
    """``ops: gradient_shards: config:`` as for a plain asset; the plan op holds it."""
    return {"plan_gradient_shards": {"config": config.model_dump()}}


def _gradient_shards_graph(proxy_checkpoints, tokenized_corpus):
    plan, work = plan_gradient_shards(proxy_checkpoints=proxy_checkpoints,
                                      tokenized_corpus=tokenized_corpus)
    result, finite = collect_gradient_shards(plan, work.map(featurise_gradient_shard).collect())
    return {"result": result, "gradient_shards_features_finite": finite}


# resource_defs on a graph asset is marked beta in Dagster 1.13; its warning would be printed
# by every step process, so it is silenced here, where the one use is.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)
    gradient_shards = dg.graph_asset(
        name="gradient_shards", group_name=GROUP, partitions_def=crawl_partitions,
        code_version=GRADIENTS_VERSION,
        check_specs=[dg.AssetCheckSpec("features_finite", asset="gradient_shards", blocking=True,
                                       description="No NaN/inf in any projected gradient or "
                                       "q, and no feature file whose rows are all alike.")],
        config=_gradient_shards_config,
        resource_defs={STEP_IO: step_json_io_manager, MANIFEST_IO: manifest_io_manager},
        description="Per proxy and corpus shard: projected per-example gradients phi of the "
        "TRAK model output and out-to-loss weights q (one safetensors file each). Each (proxy, "
        "shard) is its own step, so the multiprocess or k8s executor runs them side by side.",
    )(_gradient_shards_graph)


@crawl_asset(
    group=GROUP, kind="torch", code_version=TARGET_GRADIENTS_VERSION,
    check_specs=[dg.AssetCheckSpec("features_finite", asset="target_gradients", blocking=True,
                                   description="No NaN/inf in any target gradient or q, "
                                   "and no proxy's target features all alike.")],
    description="Per proxy: the target examples' projected gradients, with the projection "
    "gradient_shards' manifest records (it is configured there only). Apart from the "
    "candidates, so a new target-task set recomputes only these.",
)
def target_gradients(
    context: dg.AssetExecutionContext,
    config: TargetGradientConfig,
    proxy_checkpoints: Upstream,
    gradient_shards: Upstream,
    target_tasks: Upstream,
    tokenizer: Upstream,
    compute: ComputeResource,
    store: ArtifactStoreResource,
    lineage: LineageResource,
) -> dg.MaterializeResult:
    require_made_from(proxy_checkpoints, "proxy_checkpoints", tokenizer, "tokenizer")
    require_made_from(target_tasks, "target_tasks", tokenizer, "tokenizer")
    require_made_from(gradient_shards, "gradient_shards", proxy_checkpoints, "proxy_checkpoints")
    features = FeatureConfig.model_validate(
        {**gradient_shards.manifest["config"], "batch_size": config.batch_size})
    # named by the projection and the inputs it featurises, not by the candidates' files
    made = produce(context, store.get_store(), lineage.get_db(), features.identity(),
                   [proxy_checkpoints, target_tasks], lambda writer: _featurise_targets(
                       context, writer, features, proxy_checkpoints, target_tasks, compute))
    return made.result(_feature_metadata(made.summary, len(made.manifest["files"]), made.reused),
                       [_features_finite_check(made.summary)])


def _featurise_targets(context: dg.AssetExecutionContext, writer: AssetWriter,
                       feature_config: FeatureConfig, proxies: Upstream, targets: Upstream,
                       compute: ComputeResource) -> dict:
    """Every proxy's features of the select-split targets into ``writer``'s folder (a file an
    interrupted attempt finished is adopted); their summary."""
    device, artifacts = compute.setup(), writer.store
    targets_file = targets.only("targets")
    table = artifacts.read_parquet(targets_file["path"])
    # Only select-split targets become datamodel columns; the eval split stays unseen.
    table = table.filter(pc.equal(table.column("split"), "select"))
    nonfinite, degenerate, computed, rows, seconds = 0, [], 0, 0, 0.0
    lenders = _lenders_per_proxy(writer, proxies, [targets])
    for m, checkpoint in enumerate(checkpoint_paths(proxies)):
        name = target_features(m)
        entry = lenders.get(m, {}).get(name)
        if writer.has(name):
            data = writer.adopt(name, kind="targets", rows=table.num_rows)
        elif entry and (lent := read_recorded(artifacts, entry)):
            data = lent
            writer.write_copied(name, data, kind="targets", rows=table.num_rows)
            context.log.info(f"proxy {m} targets: the same proxy's in {entry['path']}: copied")
        else:
            model = load_proxy_checkpoint(artifacts, checkpoint, device)
            data, took = featurise_table(model, table, feature_config, m, targets_file["path"], device)
            writer.write_bytes(name, data, kind="targets", rows=table.num_rows)
            computed, rows, seconds = computed + 1, rows + table.num_rows, seconds + took
            context.log.info(f"proxy {m} targets: {table.num_rows} examples in {took:.1f}s")
        bad, dim, constant = feature_stats(data, artifacts.uri(f"{writer.folder}/{name}"))
        nonfinite += bad
        degenerate += [name] if constant else []
    return {"proxies": len(writer.written), "targets": table.num_rows, "dim": dim,
            "nonfinite": nonfinite, "degenerate_files": degenerate, "files_computed": computed,
            "files_reused": len(writer.written) - computed, "examples_per_s": _rate(rows, seconds),
            "proxy_checkpoints_sha256": proxies.sha256}


def _record_explanations(db: LineageDB, writer: AssetWriter, run_id: str) -> None:
    """The datamodel folder's contributions and target text into DuckDB (replacing this
    scores_id's rows), the tables behind `dsdm explain` and the explained_targets view."""
    columns = ("example_id", "shard", "effect", "rank", "target_id", "task", "tau")
    top = writer.store.iter_parquet(f"{writer.folder}/{CONTRIBUTIONS}", columns,
                                    batch_rows=SCORE_ROWS_PER_BATCH)
    key = ["crawl", "scores_id"]
    record_rows(db, "target_contributions",
                {"crawl": writer.crawl, "run_id": run_id, "scores_id": writer.config_hash}, top,
                key=key, schema=pa.schema([STORED_CONTRIBUTION_SCHEMA.field(c) for c in columns]))
    text = writer.store.read_parquet(f"{writer.folder}/{TARGET_TEXT}",
                                     columns=["target_id", "task", "prompt", "continuation"])
    record_rows(db, "datamodel_targets", {"crawl": writer.crawl, "scores_id": writer.config_hash},
                text, key=key)


def _check_same_features(grads: Upstream, targets: Upstream, target_tasks_up: Upstream) -> None:
    """Candidate and target features must share proxies and projection, and the target
    features must be of the current target tasks; otherwise scores would be meaningless.
    target_gradients takes its projection from gradient_shards, so they differ only when
    gradient_shards was re-materialised with other settings after target_gradients."""
    given, other = _feature_identity(grads), _feature_identity(targets)
    if given != other:
        differ = sorted(k for k in given.keys() | other.keys() if given.get(k) != other.get(k))
        raise dg.Failure(
            "gradient_shards and target_gradients were featurised with different settings ("
            + ", ".join(f"{k}: {given.get(k)!r} vs {other.get(k)!r}" for k in differ)
            + "); materialise target_gradients again (it takes gradient_shards' settings)")
    if grads.manifest["summary"]["proxy_checkpoints_sha256"] != targets.manifest["summary"][
            "proxy_checkpoints_sha256"]:
        raise dg.Failure("gradient_shards and target_gradients come from different "
                         "proxy_checkpoints; re-materialise the older of the two")
    if {"uri": target_tasks_up.uri, "sha256": target_tasks_up.sha256} not in targets.manifest["inputs"]:
        raise dg.Failure("target_gradients is not of the latest target_tasks; re-materialise it")


def _feature_identity(features: Upstream) -> dict:
    """The projection settings a feature manifest records (manifests written before speed-only
    settings left the fingerprint also hold those)."""
    return FeatureConfig.model_validate(features.manifest["config"]).identity()


#: bump when the datamodel folder's contents change (3: contributions.parquet, target_text.parquet)
DATAMODEL_VERSION = "3"
#: Pool rows per batch of DuckDB inserts (scores, contributions): bounds their memory.
SCORE_ROWS_PER_BATCH = 16_384
SCORE_ROW_SCHEMA = pa.schema([("example_id", pa.string()), ("task", pa.string()),
                              ("score", pa.float64())])


@crawl_asset(
    group=GROUP, code_version=DATAMODEL_VERSION,
    check_specs=[dg.AssetCheckSpec("scores_finite", asset="datamodel_weights", blocking=True,
                                   description="Every datamodel score is a finite number.")],
    description="TRAK datamodel weights tau (candidate x select-split target, ensemble over "
    "proxies) and each candidate's mean over every task's targets; the per-task scores also "
    "go to the DuckDB scores table, and each candidate's most helped and hurt targets to "
    "target_contributions. Larger = larger predicted target-loss reduction.",
)
def datamodel_weights(
    context: dg.AssetExecutionContext,
    config: DatamodelConfig,
    gradient_shards: Upstream,
    target_gradients: Upstream,
    tokenized_corpus: Upstream,
    target_tasks: Upstream,
    tokenizer: Upstream,
    compute: ComputeResource,
    store: ArtifactStoreResource,
    lineage: LineageResource,
) -> dg.MaterializeResult:
    compute.setup()  # the thread count changes float sums: every torch step applies it
    artifacts, db = store.get_store(), lineage.get_db()
    _check_same_features(gradient_shards, target_gradients, target_tasks)
    settings = config.model_dump()
    if not config.soft_threshold:  # raw scores made before the setting existed stay valid
        del settings["soft_threshold"]
    made = produce(context, artifacts, db, settings,
                   [gradient_shards, target_gradients, tokenized_corpus, target_tasks, tokenizer],
                   lambda writer: _score_pool(context, writer, config, gradient_shards,
                                              target_gradients, tokenized_corpus, target_tasks,
                                              tokenizer))
    scores = pl.from_arrow(artifacts.read_parquet(f"{made.folder}/{SCORES}"))
    tasks = made.summary["tasks"]
    # N x tasks rows, streamed into DuckDB one slice of the pool at a time.
    long = (scores.slice(start, SCORE_ROWS_PER_BATCH).unpivot(
        index="example_id", on=tasks, variable_name="task", value_name="score").to_arrow()
        for start in range(0, scores.height, SCORE_ROWS_PER_BATCH))
    constants = {"crawl": made.writer.crawl, "run_id": run_id(context),
                 "scores_id": made.writer.config_hash}
    record_rows(db, "scores", constants, long, key=["crawl", "scores_id"], schema=SCORE_ROW_SCHEMA)
    _record_explanations(db, made.writer, run_id(context))
    return made.result({
        "candidates": made.summary["candidates"], "targets": made.summary["targets"],
        "scores_id": made.writer.config_hash,
        "score_summary": dg.MetadataValue.md(markdown_table(pl.DataFrame(made.summary["per_task"]))),
    }, [dg.AssetCheckResult(check_name="scores_finite",
                            passed=bool(np.isfinite(scores.select(tasks).to_numpy()).all()))])


def _score_pool(context: dg.AssetExecutionContext, writer: AssetWriter, config: DatamodelConfig,
                grads: Upstream, target_grads: Upstream, corpus: Upstream, targets: Upstream,
                tokenizer: Upstream) -> dict:
    """tau of every pool shard against the select-split targets, each candidate's mean per
    task and its most helped and hurt targets, into ``writer``'s folder; the summary."""
    artifacts = writer.store
    targets_path = targets.only("targets")["path"]
    frame = pl.from_arrow(artifacts.read_parquet(targets_path, columns=["example_id", "task", "split"]))
    columns = frame.filter(pl.col("split") == "select")  # the eval split is never a column
    target_ids, target_tasks = columns["example_id"].to_list(), columns["task"].to_list()
    target_phi = []
    for m in range(grads.manifest["summary"]["proxies"]):
        path = target_grads.path_of(target_features(m))
        if features_header(artifacts, path).get("example_ids_sha256") != example_ids_digest(target_ids):
            raise dg.Failure("target_gradients were made for other targets than target_tasks' "
                             "select split; re-materialise target_gradients")
        target_phi.append(load_features(artifacts, path).phi)
    writer.write_parquet(TARGET_COLUMNS, columns.to_arrow(), kind="columns")
    writer.write_parquet(TARGET_TEXT, target_text(load_tokenizer(artifacts, tokenizer),
                                                  artifacts.read_parquet(targets_path), target_ids),
                         kind="target_text")
    shard_ids = [lambda f=f: artifacts.read_parquet(f["path"], columns=["example_id"]).column(0).to_pylist()
                 for f in corpus.files("examples")]
    frames, contributions = [], []
    try:
        for part in score_pool(lambda m, k: load_features(artifacts, grads.path_of(feature_shard(m, k))),
                               shard_ids, target_phi, target_ids, target_tasks,
                               config.lambda_relative, config.explain_targets,
                               config.out_to_loss_weight):
            writer.write_bytes(tau_shard(part.shard), safetensors_save({"tau": part.tau}),
                               kind="tau", rows=len(part.example_ids))
            frames.append(pl.DataFrame({"example_id": part.example_ids, **part.means}))
            contributions += [part.contributions] if part.contributions is not None else []
            context.log.info(f"scored shard {part.shard + 1}/{len(shard_ids)}")
    except ValueError as error:
        raise dg.Failure(f"datamodel_weights: {error}") from error
    if config.soft_threshold:  # thresholds need the whole pool: walk the stored tau again

        def stored_tau() -> Iterator[torch.Tensor]:
            return (load_tau(artifacts, f"{writer.folder}/{tau_shard(k)}") for k in range(len(shard_ids)))

        thresholded = soft_thresholded_means(stored_tau, target_tasks, config.soft_threshold)
        frames = [pl.DataFrame({"example_id": frame["example_id"], **means})
                  for frame, means in zip(frames, thresholded, strict=True)]
        context.log.info(f"task means of tau soft-thresholded at {config.soft_threshold:g} sd")
    scores = pl.concat(frames)
    writer.write_parquet(SCORES, scores.to_arrow(), kind="scores")
    writer.write_parquet(CONTRIBUTIONS, pa.concat_tables(contributions) if contributions
                         else STORED_CONTRIBUTION_SCHEMA.empty_table(), kind="contributions")
    tasks = [c for c in scores.columns if c != "example_id"]
    return {"tasks": tasks, "candidates": scores.height, "targets": len(target_ids),
            "per_task": scores.select(tasks).describe().to_dicts()}
