"""Ingest group: crawl -> documents -> tokenizer -> tokenized_corpus, and target_tasks.

Each asset reads its inputs, calls the engine, writes artifacts, records lineage, returns
metadata. No algorithm lives here.
"""

from collections.abc import Iterator

import dagster as dg
import polars as pl
from pydantic import Field, field_validator

from dsdm.artifacts import (
    DOCUMENTS,
    QUARANTINE,
    TARGETS,
    TOKENIZER,
    Upstream,
    corpus_shard,
    load_tokenizer,
)
from dsdm.contamination import leaked_target_ids
from dsdm.ingest import IngestConfig, crawl_inputs, ingest_crawl, ingest_summary
from dsdm.store import ArtifactStore
from dsdm.tasks import read_tasks, task_counts, tasks_input, tokenize_tasks, validate_task_name
from dsdm.tokenization import (
    TokenizerConfig,
    example_shards,
    load_pretrained,
    tokenizer_summary,
    tokenizer_to_bytes,
    train_bpe,
)
from dsdm_assets.config import StepConfig
from dsdm_assets.manifests import crawl_asset
from dsdm_assets.recording import AssetWriter, produce, record_rows, run_id
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
    crawl_url, options = crawls.crawl_url(context.partition_key), crawls.storage_options()
    artifacts, db = store.get_store(), lineage.get_db()

    def compute(writer: AssetWriter) -> dict:
        result = ingest_crawl(crawl_url, config, options,
                              progress=lambda f, n: context.log.info(f"read {f} ({n} rows so far)"))
        if not result.reconciles():
            raise dg.Failure("ingest counts do not reconcile; this is a bug")
        writer.write_parquet(DOCUMENTS, result.documents.to_arrow(), kind="documents")
        writer.write_parquet(QUARANTINE, result.quarantine.to_arrow(), kind="quarantine")
        return ingest_summary(result)

    made = produce(context, artifacts, db, config.model_dump(), crawl_inputs(crawl_url, options),
                   compute)
    quarantine = artifacts.read_parquet(f"{made.folder}/{QUARANTINE}")
    record_rows(db, "quarantine", {"crawl": made.writer.crawl, "run_id": run_id(context)},
                quarantine, key=["crawl"])
    summary = made.summary
    reasons = markdown_table(pl.DataFrame(summary["reasons"])) if summary["reasons"] else "none"
    return made.result({
        **{k: summary[k] for k in ("rows_read", "accepted", "quarantined", "duplicates")},
        "reconciliation": dg.MetadataValue.md(
            f"{summary['rows_read']} rows read = {summary['accepted']} accepted + "
            f"{summary['quarantined']} quarantined + {summary['duplicates']} duplicates"),
        "per_source": dg.MetadataValue.md(markdown_table(pl.DataFrame(summary["per_source"]))),
        "quarantine_reasons": dg.MetadataValue.md(reasons),
    })


def document_texts(store: ArtifactStore, documents: Upstream) -> Iterator[str]:
    """Every document's text in stored order, streamed (one Parquet batch in memory)."""
    for batch in store.iter_parquet(documents.only("documents")["path"], ["text"]):
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
    artifacts = store.get_store()

    def compute(writer: AssetWriter) -> dict:
        if config.pretrained_path:
            tok = load_pretrained(config.pretrained_path)
        else:
            context.log.info(f"training BPE (vocab {config.vocab_size}) on "
                             f"{documents.manifest['summary']['accepted']} documents")
            # BPE keeps word counts (growing with the distinct words), not the text.
            tok = train_bpe(document_texts(artifacts, documents), config)
        writer.write_bytes(TOKENIZER, tokenizer_to_bytes(tok), kind="tokenizer")
        return tokenizer_summary(tok)

    made = produce(context, artifacts, lineage.get_db(), config.model_dump(), [documents], compute)
    return made.result(made.summary)


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
    artifacts = store.get_store()

    def compute(writer: AssetWriter) -> dict:
        tok = load_tokenizer(artifacts, tokenizer)
        # Streamed: one batch of documents and one shard of examples in memory at a time.
        batches = artifacts.iter_parquet(documents.only("documents")["path"], ["doc_id", "text", "source"])
        totals: dict = {}
        for index, shard in enumerate(example_shards(tok, batches, config.seq_len,
                                                     config.min_example_tokens,
                                                     config.shard_size, totals)):
            writer.write_parquet(corpus_shard(index), shard, kind="examples")
            context.log.info(f"wrote shard {index} ({shard.num_rows} examples)")
        if totals["examples"] == 0:
            raise dg.Failure("no examples: every document is shorter than min_example_tokens")
        per_source = [{"source": source, **counts}
                      for source, counts in sorted(totals.pop("per_source").items())]
        return {**totals, "seq_len": config.seq_len, "shards": len(writer.written),
                "per_source": per_source}

    made = produce(context, artifacts, lineage.get_db(), config.model_dump(),
                   [documents, tokenizer], compute)
    summary = made.summary
    return made.result({
        **{k: summary[k] for k in ("examples", "tokens", "shards", "seq_len", "dropped_windows")},
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
    artifacts = store.get_store()
    seq_len = tokenized_corpus.manifest["summary"]["seq_len"]
    tasks = read_tasks(crawls.tasks_url, config.tasks, crawls.storage_options())

    def compute(writer: AssetWriter) -> dict:
        table, truncated = tokenize_tasks(load_tokenizer(artifacts, tokenizer), tasks, seq_len)
        writer.write_parquet(TARGETS, table, kind="targets")
        return {**truncated, "per_task": task_counts(table).to_dicts(),
                "leaked": leaked_target_ids(tasks["id"].to_list(),
                                            (tasks["prompt"] + " " + tasks["continuation"]).to_list(),
                                            document_texts(artifacts, documents))}

    made = produce(context, artifacts, lineage.get_db(), {**config.model_dump(), "seq_len": seq_len},
                   [documents, tokenizer, tasks_input(crawls.tasks_url, config.tasks, tasks)],
                   compute)
    summary = made.summary
    return made.result({
        "truncated_prompts": summary["truncated_prompts"],
        "truncated_continuations": summary["truncated_continuations"],
        "per_task": dg.MetadataValue.md(markdown_table(pl.DataFrame(summary["per_task"]))),
    }, [dg.AssetCheckResult(
        check_name="targets_not_in_pool", passed=not summary["leaked"],
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"leaked_targets": len(summary["leaked"]),
                  "first_leaks": dg.MetadataValue.json(summary["leaked"][:20])},
    )])
