"""Datamodels group: proxy models -> projected gradients -> TRAK datamodel weights.

Each asset is resumable: files are written atomically one proxy / shard at a time into the
asset's content-derived folder, and an interrupted run's finished files are adopted on retry.
``gradient_shards`` is a graph of ops, one step per (proxy, corpus shard), so an executor
with several processes (or pods) featurises shards side by side; ``target_gradients`` holds
the target features apart, so new target tasks do not recompute the candidates.
"""

import hashlib
import json
import time
import warnings

import dagster as dg
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import torch
from pydantic import Field
from safetensors.torch import save as safetensors_save

from dsdm.datamodels import (
    ensemble_scores,
    feature_header,
    features_from_bytes,
    features_to_bytes,
    proxy_subsets,
    round_subsets,
    task_means,
)
from dsdm.explain import CONTRIBUTION_SCHEMA, top_contributions
from dsdm.features import FeatureConfig, featurize
from dsdm.lineage import LineageDB
from dsdm.proxy import ProxyConfig, check_trainable, load_proxy, proxy_to_bytes, train_proxy
from dsdm.store import ArtifactStore, StoredArtifact
from dsdm.tokenization import decode_parts, to_tensors, tokenizer_from_bytes
from dsdm.trak import LAMBDA_RELATIVE
from dsdm_assets.config import StepConfig
from dsdm_assets.jobs import CPU_STEP_TAGS, STEP_RETRY_POLICY, TORCH_STEP_TAGS
from dsdm_assets.manifests import MANIFEST_IO, UPSTREAM, crawl_asset, manifest_io_manager
from dsdm_assets.partitions import crawl_partitions
from dsdm_assets.recording import (
    AssetWriter,
    RecordedSelection,
    Upstream,
    adopt_file,
    produce,
    read_selection,
    record_rows,
    require_made_from,
)
from dsdm_assets.tables import markdown_table
from resources import ArtifactStoreResource, ComputeResource, LineageResource
from resources.storage import step_json_io_manager, step_values_folder

GROUP = "datamodels"
GRADIENTS_VERSION = "2"  # 2: target features moved to target_gradients
TARGET_GRADIENTS_VERSION = "2"  # 2: select-split targets only
STEP_IO = "step_json_io"


def model_for_data(model: ProxyConfig, tok_up: Upstream, corpus_up: Upstream) -> ProxyConfig:
    """A model config completed with the vocabulary size and sequence length of the data;
    a value the user set that contradicts the data fails the step."""
    derived = {"vocab_size": tok_up.manifest["summary"]["vocab_size"],
               "seq_len": corpus_up.manifest["summary"]["seq_len"]}
    for key, value in derived.items():
        given = getattr(model, key)
        if key in model.model_fields_set and given != value:
            raise dg.Failure(f"model.{key}={given} contradicts the data ({value}); leave it unset")
    return ProxyConfig.model_validate({**model.model_dump(), **derived})


class ProxyModelConfig(StepConfig, ProxyConfig):
    """Proxy architecture and training recipe. vocab_size and seq_len come from the
    tokenizer and corpus; setting them to anything else is an error."""


class ProxyEnsembleConfig(StepConfig):
    """How many proxies, and on what share of the pool each is trained."""

    num_proxies: int = Field(4, ge=1, le=64, description="Proxies in the ensemble (M).")
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
    """Projected per-example gradients: method, projection and dimension."""


class DatamodelConfig(StepConfig):
    """TRAK estimator settings."""

    lambda_relative: float = Field(
        LAMBDA_RELATIVE, gt=0, description="Ridge lambda as a multiple of the kernel's mean diagonal."
    )
    explain_targets: int = Field(
        3, ge=0, le=100, description="Per candidate, how many target examples it helps most "
        "(largest tau) and hurts most (most negative) to keep for `dsdm explain` and the "
        "explained_targets view; 0 keeps none.",
    )


#: the files of one finished proxy (losses.json, written last, marks it finished) and kinds
PROXY_FILES = {"model.safetensors": "checkpoint", "config.json": "config",
               "subset.parquet": "subset", "losses.json": "losses"}


def _corpus_tensors(store: ArtifactStore, corpus: Upstream, shard: int) -> tuple[pa.Table, ...]:
    table = store.read_parquet(corpus.files("examples")[shard]["path"])
    return (table, *to_tensors(table))


def _attention(table: pa.Table) -> torch.Tensor:
    n_tokens = torch.from_numpy(table.column("n_tokens").to_numpy().astype(np.int64))
    length = len(table.column("input_ids")[0])
    return torch.arange(length)[None, :] < n_tokens[:, None]


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
    """Train (or adopt, when an interrupted attempt finished them) the proxies into
    ``writer``'s folder; the summary of their loss curves."""
    device = compute.setup()
    shards = [_corpus_tensors(writer.store, corpus, k) for k in range(len(corpus.files("examples")))]
    example_ids = pa.concat_arrays([t.column("example_id").combine_chunks() for t, *_ in shards])
    input_ids = torch.cat([ids for _, ids, _ in shards])
    loss_mask = torch.cat([mask for _, _, mask in shards])
    if previous is None:
        subsets = proxy_subsets(len(input_ids), config.num_proxies, config.train_fraction, base.seed)
    else:
        subsets = round_subsets(len(input_ids), config.num_proxies, config.train_fraction,
                                base.seed, _pool_positions(example_ids, previous))
    try:
        check_trainable(min(map(len, subsets)), base, f"each proxy's share of the pool "
                        f"(train_fraction {config.train_fraction} of {len(input_ids)})")
    except ValueError as error:
        raise dg.Failure(f"proxy_checkpoints: {error}") from error
    proxies = []
    for m, subset in enumerate(subsets):
        folder = f"proxy-{m:02d}"
        if all(writer.has(f"{folder}/{name}") for name in PROXY_FILES):
            context.log.info(f"proxy {m}: finished earlier, reusing")
            losses = json.loads(writer.adopt(f"{folder}/losses.json", "losses"))
            for name, kind in PROXY_FILES.items():
                if name != "losses.json":
                    writer.adopt(f"{folder}/{name}", kind)
        else:
            proxy_config = base.model_copy(update={"seed": base.seed + m})
            context.log.info(f"proxy {m}: training on {len(subset)} examples")
            start = time.perf_counter()
            index = torch.from_numpy(subset)
            result = train_proxy(
                proxy_config, input_ids[index], loss_mask[index], device=device,
                bf16=compute.dtype == "bfloat16" and device.type == "cuda", log_every=25,
                callback=lambda p, m=m: context.log.info(
                    f"proxy {m} step {p.step}/{p.total_steps} loss {p.loss:.3f} "
                    f"tokens/s {p.tokens_per_s:.0f}"),
            )
            losses = {"losses": result.losses, "seconds": time.perf_counter() - start,
                      "examples": len(subset)}
            writer.write_bytes(f"{folder}/model.safetensors", proxy_to_bytes(result.model),
                               kind="checkpoint")
            writer.write_bytes(f"{folder}/config.json",
                               json.dumps(proxy_config.to_dict(), indent=2).encode(), kind="config")
            writer.write_parquet(f"{folder}/subset.parquet",
                                 pa.table({"example_id": example_ids.take(pa.array(subset))}),
                                 kind="subset")
            # Written last: its presence marks this proxy finished.
            writer.write_bytes(f"{folder}/losses.json", json.dumps(losses).encode(), kind="losses")
        curve = losses["losses"]
        tenth = max(1, len(curve) // 10)
        proxies.append({"proxy": m, "examples": losses["examples"], "steps": len(curve),
                        "first_loss": float(np.mean(curve[:tenth])),
                        "last_loss": float(np.mean(curve[-tenth:])),
                        "seconds": round(losses["seconds"], 1), "curve": curve[::max(1, len(curve) // 50)]})
    return {"proxies": proxies, "pool_examples": len(input_ids),
            **({"previous_selection": previous.selection_id,
                "previous_selected": len(previous.example_ids)} if previous else {})}


def _pool_positions(example_ids: pa.Array, previous) -> np.ndarray:
    """Pool indices of a previous round's selected examples; dg.Failure if any is not in
    this pool (the selection was made from another tokenized corpus)."""
    position = {e: i for i, e in enumerate(example_ids.to_pylist())}
    missing = [e for e in previous.example_ids if e not in position]
    if missing:
        raise dg.Failure(f"previous_selection {previous.selection_id!r}: {len(missing)} of its "
                         f"{len(previous.example_ids)} examples are not in this tokenized corpus "
                         f"(e.g. {missing[0]!r}); it was made from another one")
    return np.array([position[e] for e in previous.example_ids], dtype=np.int64)


# --- gradient features --------------------------------------------------------------------
# Candidate features depend only on the proxies and the corpus, target features only on the
# proxies and the target tasks: a new target-task set reuses every candidate shard.


def _load_proxy(store: ArtifactStore, checkpoint_path: str, device: torch.device):
    config = store.read_json(checkpoint_path.replace("model.safetensors", "config.json"))
    return load_proxy(config, store.read_bytes(checkpoint_path), device=device,
                      source=store.uri(checkpoint_path))


def _featurise(model, table: pa.Table, config: FeatureConfig, proxy: int, source: str,
               device: torch.device) -> tuple[bytes, float]:
    """Proxy ``proxy``'s features of ``table``'s examples as a feature file, and the seconds
    featurisation took. Proxy m projects with seed + m, for candidates and targets alike."""
    ids, mask = to_tensors(table)
    start = time.perf_counter()
    features = featurize(model, ids, mask, config.model_copy(update={"seed": config.seed + proxy}),
                         attention_mask=_attention(table), device=device)
    seconds = time.perf_counter() - start
    data = features_to_bytes(features, table.column("example_id").to_pylist(),
                             proxy=str(proxy), source=source)
    return data, seconds


def _feature_stats(data: bytes, source: str) -> tuple[int, int, bool]:
    """(NaN/inf values in phi and q, feature dimension d, whether phi is degenerate) of the
    feature file at `source`. Degenerate: more than one row and every row the same (e.g. all
    zeros, what a corrupted checkpoint gives), so the file carries no per-example signal."""
    features = features_from_bytes(data, source)
    bad = (~torch.isfinite(features.phi)).sum() + (~torch.isfinite(features.q)).sum()
    phi = features.phi
    degenerate = len(phi) > 1 and bool((phi == phi[:1]).all())
    return int(bad), int(phi.shape[1]), degenerate


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
    writer = AssetWriter(context, store.get_store(), lineage.get_db(), config.model_dump(),
                         [proxy_checkpoints, tokenized_corpus])
    reused = writer.existing() is not None
    writer.release()  # the featurise steps run elsewhere; collect claims the folder again
    checkpoints = [f["path"] for f in proxy_checkpoints.files("checkpoint")]
    shards = [f["path"] for f in tokenized_corpus.files("examples")]
    yield dg.Output({"config": config.model_dump(), "inputs": writer.inputs,
                     "folder": writer.folder, "reused": reused, "replaced": writer.replaced,
                     "proxies": len(checkpoints), "shards": len(shards),
                     "proxy_checkpoints_sha256": proxy_checkpoints.sha256}, "plan")
    if reused:
        context.log.info(f"gradient_shards for these inputs complete in {writer.folder}: reusing")
        return
    for m, checkpoint in enumerate(checkpoints):
        for k, source in enumerate(shards):
            yield dg.DynamicOutput(
                {"folder": writer.folder, "name": f"proxy-{m:02d}/shard-{k:05d}.safetensors",
                 "proxy": m, "checkpoint": checkpoint, "source": source,
                 "config": config.model_dump()},
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
    else:
        device = compute.setup()
        model = _load_proxy(artifacts, work["checkpoint"], device)
        table = artifacts.read_parquet(work["source"])
        data, seconds = _featurise(model, table, FeatureConfig.model_validate(work["config"]),
                                   work["proxy"], work["source"], device)
        stored = artifacts.write_bytes(path, data)
        rows, computed = table.num_rows, True
        context.log.info(f"{work['name']}: {rows} examples, {rows / max(seconds, 1e-9):.1f} "
                         "examples/s")
    nonfinite, dim, degenerate = _feature_stats(data, stored.uri)
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
    verified = artifacts.read_json(f"{plan['folder']}/manifest.json") if plan["reused"] else None
    made = produce(context, artifacts, lineage.get_db(), plan["config"], plan["inputs"], collect,
                   verified=verified)
    # The values the graph's steps handed each other are spent once the manifest exists (a
    # re-execution from failure never re-runs a succeeded collect), so they do not pile up.
    removed = artifacts.remove_folder(step_values_folder(context.run.run_id))
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
    description="Per proxy: the target examples' projected gradients, with the same projection "
    "as gradient_shards (give both the same config). Apart from the candidates, so a new "
    "target-task set recomputes only these.",
)
def target_gradients(
    context: dg.AssetExecutionContext,
    config: GradientConfig,
    proxy_checkpoints: Upstream,
    target_tasks: Upstream,
    tokenizer: Upstream,
    compute: ComputeResource,
    store: ArtifactStoreResource,
    lineage: LineageResource,
) -> dg.MaterializeResult:
    require_made_from(proxy_checkpoints, "proxy_checkpoints", tokenizer, "tokenizer")
    require_made_from(target_tasks, "target_tasks", tokenizer, "tokenizer")
    made = produce(context, store.get_store(), lineage.get_db(), config.model_dump(),
                   [proxy_checkpoints, target_tasks], lambda writer: _featurise_targets(
                       context, writer, config, proxy_checkpoints, target_tasks, compute))
    return made.result(_feature_metadata(made.summary, len(made.manifest["files"]), made.reused),
                       [_features_finite_check(made.summary)])


def _featurise_targets(context: dg.AssetExecutionContext, writer: AssetWriter,
                       config: GradientConfig, proxies: Upstream, targets: Upstream,
                       compute: ComputeResource) -> dict:
    """Every proxy's features of the select-split targets into ``writer``'s folder (a file an
    interrupted attempt finished is adopted); their summary."""
    device, artifacts = compute.setup(), writer.store
    (targets_file,) = targets.files("targets")
    table = artifacts.read_parquet(targets_file["path"])
    # Only select-split targets become datamodel columns; the eval split stays unseen.
    table = table.filter(pc.equal(table.column("split"), "select"))
    feature_config = FeatureConfig.model_validate(config.model_dump())
    nonfinite, degenerate, computed, rows, seconds = 0, [], 0, 0, 0.0
    for m, checkpoint in enumerate(f["path"] for f in proxies.files("checkpoint")):
        name = f"proxy-{m:02d}/targets.safetensors"
        if writer.has(name):
            data = writer.adopt(name, kind="targets", rows=table.num_rows)
        else:
            model = _load_proxy(artifacts, checkpoint, device)
            data, took = _featurise(model, table, feature_config, m, targets_file["path"], device)
            writer.write_bytes(name, data, kind="targets", rows=table.num_rows)
            computed, rows, seconds = computed + 1, rows + table.num_rows, seconds + took
            context.log.info(f"proxy {m} targets: {table.num_rows} examples in {took:.1f}s")
        bad, dim, constant = _feature_stats(data, artifacts.uri(f"{writer.folder}/{name}"))
        nonfinite += bad
        degenerate += [name] if constant else []
    return {"proxies": len(writer.written), "targets": table.num_rows, "dim": dim,
            "nonfinite": nonfinite, "degenerate_files": degenerate, "files_computed": computed,
            "files_reused": len(writer.written) - computed, "examples_per_s": _rate(rows, seconds),
            "proxy_checkpoints_sha256": proxies.sha256}


def _target_text(artifacts: ArtifactStore, targets_up: Upstream, tok_up: Upstream,
                 target_ids: list[str]) -> pa.Table:
    """target_id, task, prompt, continuation of the datamodel's target columns, decoded."""
    table = artifacts.read_parquet(targets_up.files("targets")[0]["path"])
    row_of = {e: i for i, e in enumerate(table.column("example_id").to_pylist())}
    chosen = table.take([row_of[e] for e in target_ids])
    tok = tokenizer_from_bytes(artifacts.read_bytes(tok_up.files("tokenizer")[0]["path"]))
    prompts, continuations = decode_parts(tok, chosen)
    return pa.table({"target_id": target_ids, "task": chosen.column("task"),
                     "prompt": prompts, "continuation": continuations})


def _record_explanations(db: LineageDB, writer: AssetWriter, run_id: str) -> None:
    """The datamodel folder's contributions and target text into DuckDB (replacing this
    scores_id's rows), the tables behind `dsdm explain` and the explained_targets view."""
    columns = ("example_id", "shard", "effect", "rank", "target_id", "task", "tau")
    top = writer.store.iter_parquet(f"{writer.folder}/contributions.parquet", columns,
                                    batch_rows=SCORE_ROWS_PER_BATCH)
    schema = CONTRIBUTION_SCHEMA.append(pa.field("shard", pa.int32()))
    key = ["crawl", "scores_id"]
    record_rows(db, "target_contributions",
                {"crawl": writer.crawl, "run_id": run_id, "scores_id": writer.config_hash}, top,
                key=key, schema=pa.schema([schema.field(c) for c in columns]))
    text = writer.store.read_parquet(f"{writer.folder}/target_text.parquet",
                                     columns=["target_id", "task", "prompt", "continuation"])
    record_rows(db, "datamodel_targets", {"crawl": writer.crawl, "scores_id": writer.config_hash},
                text, key=key)


# Settings that change how fast features are computed but not the features.
_SPEED_ONLY = {"batch_size"}


def _check_same_features(grads: Upstream, targets: Upstream, target_tasks_up: Upstream) -> None:
    """Candidate and target features must share proxies and projection, and the target
    features must be of the current target tasks; otherwise scores would be meaningless."""
    given = {k: v for k, v in grads.manifest["config"].items() if k not in _SPEED_ONLY}
    other = {k: v for k, v in targets.manifest["config"].items() if k not in _SPEED_ONLY}
    if given != other:
        differ = sorted(k for k in given.keys() | other.keys() if given.get(k) != other.get(k))
        raise dg.Failure(
            "gradient_shards and target_gradients were featurised with different settings ("
            + ", ".join(f"{k}: {given.get(k)!r} vs {other.get(k)!r}" for k in differ)
            + "); give both assets the same config and re-materialise")
    if grads.manifest["summary"]["proxy_checkpoints_sha256"] != targets.manifest["summary"][
            "proxy_checkpoints_sha256"]:
        raise dg.Failure("gradient_shards and target_gradients come from different "
                         "proxy_checkpoints; re-materialise the older of the two")
    if {"uri": target_tasks_up.uri, "sha256": target_tasks_up.sha256} not in targets.manifest["inputs"]:
        raise dg.Failure("target_gradients is not of the latest target_tasks; re-materialise it")


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
    made = produce(context, artifacts, db, config.model_dump(),
                   [gradient_shards, target_gradients, tokenized_corpus, target_tasks, tokenizer],
                   lambda writer: _score_pool(context, writer, config, gradient_shards,
                                              target_gradients, tokenized_corpus, target_tasks,
                                              tokenizer))
    scores = pl.from_arrow(artifacts.read_parquet(f"{made.folder}/scores.parquet"))
    tasks = made.summary["tasks"]
    # N x tasks rows, streamed into DuckDB one slice of the pool at a time.
    long = (scores.slice(start, SCORE_ROWS_PER_BATCH).unpivot(
        index="example_id", on=tasks, variable_name="task", value_name="score").to_arrow()
        for start in range(0, scores.height, SCORE_ROWS_PER_BATCH))
    constants = {"crawl": made.writer.crawl, "run_id": context.run.run_id,
                 "scores_id": made.writer.config_hash}
    record_rows(db, "scores", constants, long, key=["crawl", "scores_id"], schema=SCORE_ROW_SCHEMA)
    _record_explanations(db, made.writer, context.run.run_id)
    return made.result({
        "candidates": made.summary["candidates"], "targets": made.summary["targets"],
        "scores_id": made.writer.config_hash,
        "score_summary": dg.MetadataValue.md(markdown_table(pl.DataFrame(made.summary["per_task"]))),
    }, [dg.AssetCheckResult(check_name="scores_finite",
                            passed=bool(np.isfinite(scores.select(tasks).to_numpy()).all()))])


def _score_pool(context: dg.AssetExecutionContext, writer: AssetWriter, config: DatamodelConfig,
                grads_up: Upstream, target_grads_up: Upstream, corpus_up: Upstream,
                targets_up: Upstream, tok_up: Upstream) -> dict:
    """tau of every pool shard against the select-split targets, each candidate's mean per
    task and its most helped and hurt targets, into ``writer``'s folder; the summary."""
    artifacts = writer.store
    targets = pl.from_arrow(artifacts.read_parquet(
        targets_up.files("targets")[0]["path"], columns=["example_id", "task", "split"]))
    select = (targets["split"] == "select").to_numpy()
    num_proxies = grads_up.manifest["summary"]["proxies"]
    num_shards = grads_up.manifest["summary"]["shards"]
    select_ids = targets.filter(pl.Series(select))["example_id"].to_list()
    digest = hashlib.sha256("\n".join(select_ids).encode()).hexdigest()
    target_phi = []
    for m in range(num_proxies):
        path = target_grads_up.path_of(f"proxy-{m:02d}/targets.safetensors")
        data = artifacts.read_bytes(path)
        if feature_header(data, artifacts.uri(path)).get("example_ids_sha256") != digest:
            raise dg.Failure("target_gradients were made for other targets than target_tasks' "
                             "select split; re-materialise target_gradients")
        target_phi.append(features_from_bytes(data, artifacts.uri(path)).phi)

    def load_shard(m: int, k: int):
        path = grads_up.path_of(f"proxy-{m:02d}/shard-{k:05d}.safetensors")
        return features_from_bytes(artifacts.read_bytes(path), artifacts.uri(path))

    select_targets = targets.filter(pl.Series(select))
    writer.write_parquet("target_columns.parquet", select_targets.to_arrow(), kind="columns")
    writer.write_parquet("target_text.parquet",
                         _target_text(artifacts, targets_up, tok_up, select_ids), kind="target_text")
    target_tasks_of = select_targets["task"].to_list()
    frames, contributions = [], []
    for k, tau in enumerate(ensemble_scores(load_shard, num_shards, target_phi,
                                            config.lambda_relative)):
        corpus_file = corpus_up.files("examples")[k]
        ids = artifacts.read_parquet(corpus_file["path"], columns=["example_id"]).column(0)
        path = grads_up.path_of(f"proxy-00/shard-{k:05d}.safetensors")
        header = feature_header(artifacts.read_bytes(path), artifacts.uri(path))
        if int(header["rows"]) != len(ids):
            raise dg.Failure(f"feature shard {k} has {header['rows']} rows, corpus {len(ids)}")
        writer.write_bytes(f"tau-{k:05d}.safetensors",
                           safetensors_save({"tau": tau.float().contiguous()}),
                           kind="tau", rows=len(ids))
        means = task_means(tau, target_tasks_of)
        frames.append(pl.DataFrame({"example_id": ids.to_pylist(), **means}))
        if config.explain_targets:
            top = top_contributions(tau, ids.to_pylist(), select_ids, target_tasks_of,
                                    config.explain_targets)
            contributions.append(top.append_column("shard", pa.array([k] * top.num_rows, pa.int32())))
        context.log.info(f"scored shard {k + 1}/{num_shards}")
    scores = pl.concat(frames)
    writer.write_parquet("scores.parquet", scores.to_arrow(), kind="scores")
    writer.write_parquet("contributions.parquet", pa.concat_tables(contributions) if contributions
                         else CONTRIBUTION_SCHEMA.append(pa.field("shard", pa.int32())).empty_table(),
                         kind="contributions")
    tasks = [c for c in scores.columns if c != "example_id"]
    return {"tasks": tasks, "candidates": scores.height, "targets": int(select.sum()),
            "per_task": scores.select(tasks).describe().to_dicts()}
