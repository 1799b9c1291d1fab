"""Ingest group: crawl -> documents -> tokenizer -> tokenized_corpus, and target_tasks.

Each asset reads its inputs, calls the engine, writes artifacts, records lineage, returns
metadata. No algorithm lives here.
"""

import hashlib
from collections.abc import Iterator

import dagster as dg
import fsspec
import polars as pl
import pyarrow as pa
from pydantic import Field, field_validator

from dsdm.contamination import find_overlaps
from dsdm.ingest import IngestConfig, ingest_crawl, list_shards, shard_refusal
from dsdm.store import ArtifactStore, file_sha256
from dsdm.tasks import read_tasks, tokenize_tasks, validate_task_name
from dsdm.tokenization import (
    TokenizerConfig,
    example_shards,
    load_pretrained,
    tokenizer_from_bytes,
    tokenizer_summary,
    tokenizer_to_bytes,
    train_bpe,
)
from dsdm_assets.config import StepConfig
from dsdm_assets.manifests import crawl_asset
from dsdm_assets.recording import AssetWriter, Upstream
from dsdm_assets.tables import markdown_table
from resources import ArtifactStoreResource, CrawlSourceResource, LineageResource

GROUP = "ingest"


class DocumentsConfig(StepConfig, IngestConfig):
    """Validation bounds and field names of the crawl's rows."""


class TokenizerAssetConfig(StepConfig, TokenizerConfig):
    """Byte-level BPE trained on the crawl, or a local pretrained tokenizer."""


class CorpusConfig(StepConfig):
    """How documents become fixed-length training/selection examples."""

    seq_len: int = Field(128, ge=8, le=8192, description="Tokens per example (paper: 1024).")
    min_example_tokens: int = Field(
        16, ge=2, description="Windows shorter than this (document tails) are dropped and counted."
    )
    shard_size: int = Field(
        1024, ge=16, description="Examples per shard; shards are the unit of parallel work."
    )


class TargetTasksConfig(StepConfig):
    """Which target tasks to load from the crawl source's ``tasks_url``."""

    tasks: list[str] = Field(
        default_factory=lambda: ["wiki_qa", "lambada_cloze", "tech_faq"],
        description="Task names; each is a <name>.jsonl.gz file with select and eval splits.",
    )

    @field_validator("tasks")
    @classmethod
    def _names_not_paths(cls, names: list[str]) -> list[str]:
        if not names:
            raise ValueError("give at least one task name")
        return [validate_task_name(name) for name in names]


@crawl_asset(
    group=GROUP, code_version="1",
    description="Validated, whitespace-normalised, exact-deduplicated crawl documents "
    "(doc_id = content hash). Rejected rows go to the DuckDB quarantine table with file, "
    "row and reason; rows read = accepted + quarantined + duplicates.",
)
def documents(
    context: dg.AssetExecutionContext,
    config: DocumentsConfig,
    crawls: CrawlSourceResource,
    store: ArtifactStoreResource,
    lineage: LineageResource,
) -> dg.MaterializeResult:
    crawl_url = crawls.crawl_url(context.partition_key)
    options = crawls.storage_options()
    artifacts, db = store.get_store(), lineage.get_db()
    fs, root = fsspec.core.url_to_fs(crawl_url, **options)
    shards = list_shards(crawl_url, options)
    # A refused shard (a link out of the folder, a device) is never opened, here or in ingest.
    inputs = [(fs.unstrip_protocol(p), file_sha256(fs, p) if not shard_refusal(fs, root, p)
               else "refused") for p in shards]
    writer = AssetWriter(context, artifacts, db, "documents", config.model_dump(), inputs)

    manifest = writer.existing()
    reused = manifest is not None
    if reused:
        quarantine = pl.from_arrow(artifacts.read_parquet(f"{writer.folder}/quarantine.parquet"))
        writer.record(manifest, reused=True)
        context.log.info(f"documents for {writer.crawl} unchanged: reusing {writer.folder}")
    else:
        result = ingest_crawl(
            crawl_url, config, options,
            progress=lambda f, n: context.log.info(f"read {f} ({n} rows so far)"),
        )
        if not result.reconciles():
            raise dg.Failure("ingest counts do not reconcile; this is a bug")
        docs = result.documents
        quarantine = result.quarantine
        writer.write_parquet("documents.parquet", docs.to_arrow(), kind="documents")
        writer.write_parquet("quarantine.parquet", quarantine.to_arrow(), kind="quarantine")
        per_source = (
            docs.group_by("source").agg(pl.len().alias("documents"), pl.col("n_chars").sum().alias("chars"))
            .sort("source")
        )
        manifest = writer.finish({
            "rows_read": result.rows_read, "accepted": docs.height,
            "quarantined": result.quarantined, "duplicates": result.duplicates,
            "per_source": per_source.to_dicts(),
            "reasons": quarantine.group_by("reason").len().sort("reason").to_dicts(),
        })

    db.replace_rows(
        "quarantine", {"crawl": writer.crawl},
        pa.table({
            "crawl": [writer.crawl] * quarantine.height,
            "run_id": [context.run.run_id] * quarantine.height,
            "file": quarantine["file"].to_list(), "row": quarantine["row"].to_list(),
            "reason": quarantine["reason"].to_list(), "detail": quarantine["detail"].to_list(),
            "excerpt": quarantine["excerpt"].to_list(),
        }),
    )
    summary = manifest["summary"]
    per_source = pl.DataFrame(summary["per_source"])
    reasons = pl.DataFrame(summary["reasons"]) if summary["reasons"] else None
    return dg.MaterializeResult(value=writer.output(), data_version=writer.data_version, metadata={
        **writer.base_metadata(manifest, reused),
        "rows_read": summary["rows_read"],
        "accepted": summary["accepted"],
        "quarantined": summary["quarantined"],
        "duplicates": summary["duplicates"],
        "reconciliation": dg.MetadataValue.md(
            f"{summary['rows_read']} rows read = {summary['accepted']} accepted + "
            f"{summary['quarantined']} quarantined + {summary['duplicates']} duplicates"
        ),
        "per_source": dg.MetadataValue.md(markdown_table(per_source)),
        "quarantine_reasons": dg.MetadataValue.md(
            markdown_table(reasons) if reasons is not None else "none"
        ),
    })


def document_texts(artifacts: ArtifactStore, docs_up: Upstream) -> Iterator[str]:
    """Every document's text in stored order, streamed (one Parquet batch in memory)."""
    (doc_file,) = docs_up.files("documents")
    for batch in artifacts.iter_parquet(doc_file["path"], ["text"]):
        yield from batch.column(0).to_pylist()


@crawl_asset(
    group=GROUP, code_version="1",
    description="Byte-level BPE trained on the crawl's documents (or a local pretrained "
    "tokenizer), stored as tokenizer.json.",
)
def tokenizer(
    context: dg.AssetExecutionContext,
    config: TokenizerAssetConfig,
    documents: Upstream,
    store: ArtifactStoreResource,
    lineage: LineageResource,
) -> dg.MaterializeResult:
    artifacts, db = store.get_store(), lineage.get_db()
    docs_up = documents
    writer = AssetWriter(
        context, artifacts, db, "tokenizer", config.model_dump(), [(docs_up.uri, docs_up.sha256)]
    )
    manifest = writer.existing()
    reused = manifest is not None
    if reused:
        writer.record(manifest, reused=True)
    else:
        if config.pretrained_path:
            tok = load_pretrained(config.pretrained_path)
        else:
            context.log.info(f"training BPE (vocab {config.vocab_size}) on "
                             f"{docs_up.manifest['summary']['accepted']} documents")
            # BPE keeps word counts (growing with the distinct words), not the text.
            tok = train_bpe(document_texts(artifacts, docs_up), config)
        writer.write_bytes("tokenizer.json", tokenizer_to_bytes(tok), kind="tokenizer")
        manifest = writer.finish(tokenizer_summary(tok))
    return dg.MaterializeResult(value=writer.output(), data_version=writer.data_version, metadata={
        **writer.base_metadata(manifest, reused), **manifest["summary"],
    })


@crawl_asset(
    group=GROUP, code_version="1",
    description="Fixed-length token examples (one document per example), as Parquet shards "
    "with example_id, doc_id, source, n_tokens, score_from, input_ids.",
)
def tokenized_corpus(
    context: dg.AssetExecutionContext,
    config: CorpusConfig,
    documents: Upstream,
    tokenizer: Upstream,
    store: ArtifactStoreResource,
    lineage: LineageResource,
) -> dg.MaterializeResult:
    artifacts, db = store.get_store(), lineage.get_db()
    docs_up, tok_up = documents, tokenizer
    writer = AssetWriter(
        context, artifacts, db, "tokenized_corpus", config.model_dump(),
        [(docs_up.uri, docs_up.sha256), (tok_up.uri, tok_up.sha256)],
    )
    manifest = writer.existing()
    reused = manifest is not None
    if reused:
        writer.record(manifest, reused=True)
    else:
        tok = tokenizer_from_bytes(artifacts.read_bytes(tok_up.files("tokenizer")[0]["path"]))
        (doc_file,) = docs_up.files("documents")
        # Streamed: one batch of documents and one shard of examples in memory at a time.
        batches = artifacts.iter_parquet(doc_file["path"], ["doc_id", "text", "source"])
        totals: dict = {}
        for index, shard in enumerate(example_shards(tok, batches, config.seq_len,
                                                     config.min_example_tokens,
                                                     config.shard_size, totals)):
            writer.write_parquet(f"shard-{index:05d}.parquet", shard, kind="examples")
            context.log.info(f"wrote shard {index} ({shard.num_rows} examples)")
        if totals["examples"] == 0:
            raise dg.Failure("no examples: every document is shorter than min_example_tokens")
        per_source = [{"source": source, **counts}
                      for source, counts in sorted(totals.pop("per_source").items())]
        manifest = writer.finish({
            **totals, "seq_len": config.seq_len, "shards": len(writer.written),
            "per_source": per_source,
        })
    summary = manifest["summary"]
    return dg.MaterializeResult(value=writer.output(), data_version=writer.data_version, metadata={
        **writer.base_metadata(manifest, reused),
        "examples": summary["examples"], "tokens": summary["tokens"],
        "shards": summary["shards"], "seq_len": summary["seq_len"],
        "dropped_windows": summary["dropped_windows"],
        "per_source": dg.MetadataValue.md(markdown_table(pl.DataFrame(summary["per_source"]))),
    })


@crawl_asset(
    group=GROUP, code_version="1",
    check_specs=[dg.AssetCheckSpec(
        "targets_not_in_pool", asset="target_tasks",
        description="No target prompt + continuation shares a 13-word n-gram with a pool "
        "document (a leak rewards memorisation, not transfer). Warns, listing the leaks.",
    )],
    description="Target tasks (prompt -> continuation) tokenised like the corpus; only "
    "continuation tokens are scored. 'select' drives selection, 'eval' only measures it.",
)
def target_tasks(
    context: dg.AssetExecutionContext,
    config: TargetTasksConfig,
    documents: Upstream,
    tokenizer: Upstream,
    tokenized_corpus: Upstream,
    crawls: CrawlSourceResource,
    store: ArtifactStoreResource,
    lineage: LineageResource,
) -> dg.MaterializeResult:
    artifacts, db = store.get_store(), lineage.get_db()
    docs_up, tok_up, corpus_up = documents, tokenizer, tokenized_corpus
    seq_len = corpus_up.manifest["summary"]["seq_len"]
    tasks = read_tasks(crawls.tasks_url, config.tasks, crawls.storage_options())
    task_digest = hashlib.sha256(
        tasks.select("id", "prompt", "continuation", "split").write_ipc(None).getvalue()
    ).hexdigest()
    writer = AssetWriter(
        context, artifacts, db, "target_tasks", {**config.model_dump(), "seq_len": seq_len},
        [(docs_up.uri, docs_up.sha256), (tok_up.uri, tok_up.sha256),
         (f"{crawls.tasks_url}#{','.join(config.tasks)}", task_digest)],
    )
    manifest = writer.existing()
    reused = manifest is not None
    if reused:
        writer.record(manifest, reused=True)
    else:
        tok = tokenizer_from_bytes(artifacts.read_bytes(tok_up.files("tokenizer")[0]["path"]))
        table, truncated = tokenize_tasks(tok, tasks, seq_len)
        writer.write_parquet("targets.parquet", table, kind="targets")
        frame = pl.from_arrow(table.select(["task", "split", "n_tokens", "score_from"]))
        per_task = (
            frame.group_by("task", "split")
            .agg(pl.len().alias("examples"),
                 (pl.col("n_tokens") - pl.col("score_from")).mean().alias("scored_tokens_mean"))
            .sort("task", "split")
        )
        overlaps = find_overlaps(document_texts(artifacts, docs_up),
                                 (tasks["prompt"] + " " + tasks["continuation"]).to_list())
        leaked = sorted({tasks["id"][o.target_index] for o in overlaps})
        manifest = writer.finish({**truncated, "per_task": per_task.to_dicts(), "leaked": leaked})
    summary = manifest["summary"]
    return dg.MaterializeResult(value=writer.output(), data_version=writer.data_version, metadata={
        **writer.base_metadata(manifest, reused),
        "truncated_prompts": summary["truncated_prompts"],
        "truncated_continuations": summary["truncated_continuations"],
        "per_task": dg.MetadataValue.md(markdown_table(pl.DataFrame(summary["per_task"]))),
    }, check_results=[dg.AssetCheckResult(
        check_name="targets_not_in_pool", passed=not summary["leaked"],
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"leaked_targets": len(summary["leaked"]),
                  "first_leaks": dg.MetadataValue.json(summary["leaked"][:20])},
    )])

