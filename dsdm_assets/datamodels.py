"""Datamodels group: proxy models -> projected gradients -> TRAK datamodel weights.

Each asset is resumable: files are written atomically one proxy / shard at a time into the
asset's content-derived folder, and an interrupted run's finished files are adopted on retry.
"""

import json
import time

import dagster as dg
import numpy as np
import polars as pl
import pyarrow as pa
import torch
from pydantic import Field
from safetensors.torch import save as safetensors_save

from dsdm.datamodels import (
    ensemble_scores,
    feature_header,
    features_from_bytes,
    features_to_bytes,
    proxy_subsets,
    task_means,
)
from dsdm.features import FeatureConfig, featurize
from dsdm.proxy import ProxyConfig, load_proxy, proxy_to_bytes, train_proxy
from dsdm.store import ArtifactStore
from dsdm.tokenization import to_tensors
from dsdm_assets.ingest import target_tasks, tokenized_corpus, tokenizer
from dsdm_assets.partitions import crawl_partitions
from dsdm_assets.recording import AssetWriter, Upstream, read_upstream
from dsdm_assets.tables import markdown_table
from resources import ArtifactStoreResource, ComputeResource, LineageResource

GROUP = "datamodels"


class ProxyModelConfig(dg.Config, ProxyConfig):
    """Proxy architecture and training recipe. vocab_size and seq_len come from the
    tokenizer and corpus; setting them to anything else is an error."""


class ProxyEnsembleConfig(dg.Config):
    """How many proxies, and on what share of the pool each is trained."""

    num_proxies: int = Field(2, ge=1, le=64, description="Proxies in the ensemble (M).")
    train_fraction: float = Field(
        0.5, gt=0, le=1, description="Share of the pool each proxy trains on (random, seeded)."
    )
    model: ProxyModelConfig = Field(default_factory=ProxyModelConfig)


class GradientConfig(dg.Config, FeatureConfig):
    """Projected per-example gradients: method, projection and dimension."""


class DatamodelConfig(dg.Config):
    """TRAK estimator settings."""

    lambda_relative: float = Field(
        0.01, gt=0, description="Ridge lambda as a multiple of the kernel's mean diagonal."
    )


def _corpus_tensors(store: ArtifactStore, corpus: Upstream, shard: int) -> tuple[pa.Table, ...]:
    table = store.read_parquet(corpus.files("examples")[shard]["path"])
    return (table, *to_tensors(table))


def _attention(table: pa.Table) -> torch.Tensor:
    n_tokens = torch.from_numpy(table.column("n_tokens").to_numpy().astype(np.int64))
    length = len(table.column("input_ids")[0])
    return torch.arange(length)[None, :] < n_tokens[:, None]


def _load_proxies(store: ArtifactStore, proxies: Upstream, device: torch.device) -> list:
    models = []
    for entry in proxies.files("checkpoint"):
        config = store.read_json(entry["path"].replace("model.safetensors", "config.json"))
        models.append(load_proxy(config, store.read_bytes(entry["path"]), device=device))
    return models


@dg.asset(
    group_name=GROUP, partitions_def=crawl_partitions, code_version="1",
    deps=[tokenizer, tokenized_corpus],
    check_specs=[dg.AssetCheckSpec("loss_fell", asset="proxy_checkpoints", blocking=True,
                                   description="Every proxy's late training loss is below its early loss.")],
    description="M small GPT-NeoX proxies, each trained on its own seeded random fraction of "
    "the tokenized pool; safetensors + JSON config + the example ids each saw.",
)
def proxy_checkpoints(
    context: dg.AssetExecutionContext,
    config: ProxyEnsembleConfig,
    compute: ComputeResource,
    store: ArtifactStoreResource,
    lineage: LineageResource,
) -> dg.MaterializeResult:
    artifacts, db = store.get_store(), lineage.get_db()
    tok_up = read_upstream(context, artifacts, "tokenizer")
    corpus_up = read_upstream(context, artifacts, "tokenized_corpus")
    derived = {"vocab_size": tok_up.manifest["summary"]["vocab_size"],
               "seq_len": corpus_up.manifest["summary"]["seq_len"]}
    for key, value in derived.items():
        given = getattr(config.model, key)
        if key in config.model.model_fields_set and given != value:
            raise dg.Failure(f"model.{key}={given} contradicts the data ({value}); leave it unset")
    base = ProxyConfig.model_validate({**config.model.model_dump(), **derived})
    writer = AssetWriter(
        context, artifacts, db, "proxy_checkpoints",
        {"num_proxies": config.num_proxies, "train_fraction": config.train_fraction,
         "model": base.to_dict()},
        [(tok_up.uri, tok_up.sha256), (corpus_up.uri, corpus_up.sha256)],
    )
    manifest = writer.existing()
    reused = manifest is not None
    if reused:
        writer.record(manifest, reused=True)
    else:
        device = compute.setup()
        shards = [_corpus_tensors(artifacts, corpus_up, k) for k in range(len(corpus_up.files("examples")))]
        example_ids = pa.concat_arrays([t.column("example_id").combine_chunks() for t, *_ in shards])
        input_ids = torch.cat([ids for _, ids, _ in shards])
        loss_mask = torch.cat([mask for _, _, mask in shards])
        subsets = proxy_subsets(len(input_ids), config.num_proxies, config.train_fraction, base.seed)
        proxies = []
        for m, subset in enumerate(subsets):
            folder = f"proxy-{m:02d}"
            if writer.has(f"{folder}/losses.json"):
                context.log.info(f"proxy {m}: finished earlier, reusing")
                losses = json.loads(writer.adopt(f"{folder}/losses.json", "losses"))
                for name, kind in (("model.safetensors", "checkpoint"), ("config.json", "config"),
                                   ("subset.parquet", "subset")):
                    writer.adopt(f"{folder}/{name}", kind)
            else:
                proxy_config = base.model_copy(update={"seed": base.seed + m})
                context.log.info(f"proxy {m}: training on {len(subset)} examples")
                start = time.perf_counter()
                index = torch.from_numpy(subset)
                result = train_proxy(
                    proxy_config, input_ids[index], loss_mask[index], device=device,
                    bf16=compute.dtype == "bfloat16" and device.type == "cuda",
                    log_every=25,
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
        manifest = writer.finish({"proxies": proxies, "pool_examples": len(input_ids)})
    proxies = manifest["summary"]["proxies"]
    fell = [p["last_loss"] < p["first_loss"] for p in proxies]
    table = pl.DataFrame([{k: v for k, v in p.items() if k != "curve"} for p in proxies])
    return dg.MaterializeResult(
        metadata={
            **writer.base_metadata(manifest, reused),
            "proxies": dg.MetadataValue.md(markdown_table(table)),
            "final_loss_mean": float(np.mean([p["last_loss"] for p in proxies])),
            "loss_curve_proxy_0": dg.MetadataValue.json(proxies[0]["curve"]),
        },
        check_results=[dg.AssetCheckResult(
            check_name="loss_fell", passed=all(fell),
            metadata={"first_vs_last": dg.MetadataValue.md(markdown_table(
                table.select("proxy", "first_loss", "last_loss")))},
        )],
    )


@dg.asset(
    group_name=GROUP, partitions_def=crawl_partitions, code_version="1",
    deps=[proxy_checkpoints, tokenized_corpus, target_tasks],
    check_specs=[dg.AssetCheckSpec("features_finite", asset="gradient_shards", blocking=True,
                                   description="No NaN/inf in any projected gradient or q.")],
    description="Per proxy and corpus shard: projected per-example gradients phi of the TRAK "
    "model output and out-to-loss weights q (one safetensors file each), plus the target "
    "examples' features under the same projection.",
)
def gradient_shards(
    context: dg.AssetExecutionContext,
    config: GradientConfig,
    compute: ComputeResource,
    store: ArtifactStoreResource,
    lineage: LineageResource,
) -> dg.MaterializeResult:
    artifacts, db = store.get_store(), lineage.get_db()
    proxies_up = read_upstream(context, artifacts, "proxy_checkpoints")
    corpus_up = read_upstream(context, artifacts, "tokenized_corpus")
    targets_up = read_upstream(context, artifacts, "target_tasks")
    writer = AssetWriter(
        context, artifacts, db, "gradient_shards", config.model_dump(),
        [(u.uri, u.sha256) for u in (proxies_up, corpus_up, targets_up)],
    )
    manifest = writer.existing()
    reused = manifest is not None
    if reused:
        writer.record(manifest, reused=True)
    else:
        device = compute.setup()
        feature_config = FeatureConfig.model_validate(config.model_dump())
        models = _load_proxies(artifacts, proxies_up, device)
        targets = artifacts.read_parquet(targets_up.files("targets")[0]["path"])
        jobs = [(f"shard-{k:05d}", f["path"]) for k, f in enumerate(corpus_up.files("examples"))]
        jobs.append(("targets", targets_up.files("targets")[0]["path"]))
        nonfinite, computed, adopted, rows, seconds = 0, 0, 0, 0, 0.0
        for m, model in enumerate(models):
            proxy_features = feature_config.model_copy(update={"seed": feature_config.seed + m})
            for name, source_path in jobs:
                file = f"proxy-{m:02d}/{name}.safetensors"
                table = targets if name == "targets" else artifacts.read_parquet(source_path)
                if writer.has(file):
                    data = writer.adopt(file, kind="targets" if name == "targets" else "features",
                                        rows=table.num_rows)
                    adopted += 1
                else:
                    ids, mask = to_tensors(table)
                    start = time.perf_counter()
                    features = featurize(model, ids, mask, proxy_features,
                                         attention_mask=_attention(table), device=device)
                    seconds += time.perf_counter() - start
                    rows += table.num_rows
                    data = features_to_bytes(features, table.column("example_id").to_pylist(),
                                             proxy=str(m), source=source_path)
                    writer.write_bytes(file, data, kind="targets" if name == "targets" else "features",
                                       rows=table.num_rows)
                    computed += 1
                    context.log.info(f"proxy {m} {name}: {table.num_rows} examples; "
                                     f"{rows / max(seconds, 1e-9):.1f} examples/s overall")
                features = features_from_bytes(data)
                nonfinite += int((~torch.isfinite(features.phi)).sum() + (~torch.isfinite(features.q)).sum())
                dim = features.phi.shape[1]
        manifest = writer.finish({
            "proxies": len(models), "shards": len(jobs) - 1, "dim": dim, "nonfinite": nonfinite,
            "files_computed": computed, "files_reused": adopted,
            "examples_per_s": rows / seconds if seconds else None,
        })
    summary = manifest["summary"]
    return dg.MaterializeResult(
        metadata={**writer.base_metadata(manifest, reused),
                  **{k: v for k, v in summary.items() if v is not None}},
        check_results=[dg.AssetCheckResult(
            check_name="features_finite", passed=summary["nonfinite"] == 0,
            metadata={"nonfinite_values": summary["nonfinite"]},
        )],
    )


@dg.asset(
    group_name=GROUP, partitions_def=crawl_partitions, code_version="1",
    deps=[gradient_shards, tokenized_corpus, target_tasks],
    check_specs=[dg.AssetCheckSpec("scores_finite", asset="datamodel_weights", blocking=True,
                                   description="Every datamodel score is a finite number.")],
    description="TRAK datamodel weights tau (candidate x select-split target, ensemble over "
    "proxies) and each candidate's mean over every task's targets; the per-task scores also "
    "go to the DuckDB scores table. Larger = larger predicted target-loss reduction.",
)
def datamodel_weights(
    context: dg.AssetExecutionContext,
    config: DatamodelConfig,
    store: ArtifactStoreResource,
    lineage: LineageResource,
) -> dg.MaterializeResult:
    artifacts, db = store.get_store(), lineage.get_db()
    grads_up = read_upstream(context, artifacts, "gradient_shards")
    corpus_up = read_upstream(context, artifacts, "tokenized_corpus")
    targets_up = read_upstream(context, artifacts, "target_tasks")
    writer = AssetWriter(
        context, artifacts, db, "datamodel_weights", config.model_dump(),
        [(u.uri, u.sha256) for u in (grads_up, corpus_up, targets_up)],
    )
    manifest = writer.existing()
    reused = manifest is not None
    if reused:
        writer.record(manifest, reused=True)
        scores = pl.from_arrow(artifacts.read_parquet(f"{writer.folder}/scores.parquet"))
    else:
        targets = pl.from_arrow(artifacts.read_parquet(
            targets_up.files("targets")[0]["path"], columns=["example_id", "task", "split"]))
        select = (targets["split"] == "select").to_numpy()
        num_proxies = grads_up.manifest["summary"]["proxies"]
        num_shards = grads_up.manifest["summary"]["shards"]
        target_phi = [features_from_bytes(artifacts.read_bytes(grads_up.path_of(f"proxy-{m:02d}/targets.safetensors")))
                      .phi[torch.from_numpy(select)] for m in range(num_proxies)]

        def load_shard(m: int, k: int):
            return features_from_bytes(
                artifacts.read_bytes(grads_up.path_of(f"proxy-{m:02d}/shard-{k:05d}.safetensors")))

        select_targets = targets.filter(pl.Series(select))
        writer.write_parquet("target_columns.parquet", select_targets.to_arrow(), kind="columns")
        frames = []
        for k, tau in enumerate(ensemble_scores(load_shard, num_shards, target_phi,
                                                config.lambda_relative)):
            corpus_file = corpus_up.files("examples")[k]
            ids = artifacts.read_parquet(corpus_file["path"], columns=["example_id"]).column(0)
            header = feature_header(
                artifacts.read_bytes(grads_up.path_of(f"proxy-00/shard-{k:05d}.safetensors")))
            if int(header["rows"]) != len(ids):
                raise dg.Failure(f"feature shard {k} has {header['rows']} rows, corpus {len(ids)}")
            writer.write_bytes(f"tau-{k:05d}.safetensors",
                               safetensors_save({"tau": tau.float().contiguous()}),
                               kind="tau", rows=len(ids))
            means = task_means(tau, select_targets["task"].to_list())
            frames.append(pl.DataFrame({"example_id": ids.to_pylist(), **means}))
            context.log.info(f"scored shard {k + 1}/{num_shards}")
        scores = pl.concat(frames)
        writer.write_parquet("scores.parquet", scores.to_arrow(), kind="scores")
        tasks = [c for c in scores.columns if c != "example_id"]
        manifest = writer.finish({
            "tasks": tasks, "candidates": scores.height, "targets": int(select.sum()),
            "per_task": scores.select(tasks).describe().to_dicts(),
        })
    tasks = manifest["summary"]["tasks"]
    long = scores.unpivot(index="example_id", on=tasks, variable_name="task", value_name="score")
    n = long.height
    db.replace_rows("scores", {"crawl": writer.crawl, "scores_id": writer.config_hash}, pa.table({
        "crawl": [writer.crawl] * n, "run_id": [context.run.run_id] * n,
        "scores_id": [writer.config_hash] * n, "example_id": long["example_id"],
        "task": long["task"], "score": long["score"],
    }))
    finite = bool(np.isfinite(scores.select(tasks).to_numpy()).all())
    return dg.MaterializeResult(
        metadata={
            **writer.base_metadata(manifest, reused),
            "candidates": manifest["summary"]["candidates"],
            "targets": manifest["summary"]["targets"],
            "scores_id": writer.config_hash,
            "score_summary": dg.MetadataValue.md(markdown_table(
                pl.DataFrame(manifest["summary"]["per_task"]))),
        },
        check_results=[dg.AssetCheckResult(check_name="scores_finite", passed=finite)],
    )
