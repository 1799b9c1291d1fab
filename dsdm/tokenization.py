"""Tokenizer training/loading and fixed-length example construction.

Examples are the unit of selection. Each is a window of ``seq_len`` token ids taken from ONE
document (never spanning two), so every example maps back to the document it came from.
Short tails are padded; ``n_tokens`` counts the real tokens and ``score_from`` the first
position whose token is scored (1 for pool text; the first continuation token for target
tasks). Loss masks are derived from these two numbers, never stored.
"""

import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


class TokenizerConfig(BaseModel):
    """Which tokenizer to use: trained on the crawl, or a local pretrained one."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    vocab_size: int = Field(
        4096, ge=260, le=262_144,
        description="BPE vocabulary size when training on the crawl (small suits small proxies).",
    )
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")
    pretrained_path: str | None = Field(
        None,
        description="Local tokenizer.json, or a folder with tokenizer.json or vocab.json + "
        "merges.txt (GPT-2 form). When set, no tokenizer is trained.",
    )


def train_bpe(texts: Iterable[str], config: TokenizerConfig) -> Tokenizer:
    """Byte-level BPE trained on ``texts``; EOS and PAD are special tokens 0 and 1."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_pretrained(path: str) -> Tokenizer:
    """Load a tokenizer from local files only (parsed as data; nothing is executed)."""
    import os

    candidates = [path, os.path.join(path, "tokenizer.json")]
    for candidate in candidates:
        if os.path.isfile(candidate) and candidate.endswith(".json") and not candidate.endswith("vocab.json"):
            tokenizer = Tokenizer.from_file(candidate)
            break
    else:
        vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
        if not (os.path.isfile(vocab) and os.path.isfile(merges)):
            raise FileNotFoundError(
                f"no tokenizer at {path!r}: expected tokenizer.json, or vocab.json + merges.txt"
            )
        tokenizer = Tokenizer(models.BPE.from_file(vocab, merges))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
    missing = [t for t in (EOS_TOKEN, PAD_TOKEN) if tokenizer.token_to_id(t) is None]
    if missing:
        tokenizer.add_special_tokens(missing)
    return tokenizer


def special_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """(eos_id, pad_id)."""
    eos, pad = tokenizer.token_to_id(EOS_TOKEN), tokenizer.token_to_id(PAD_TOKEN)
    if eos is None or pad is None:
        raise ValueError(f"tokenizer lacks {EOS_TOKEN} or {PAD_TOKEN}")
    return eos, pad


def chunk_documents(
    tokenizer: Tokenizer,
    doc_ids: Sequence[str],
    texts: Sequence[str],
    sources: Sequence[str],
    seq_len: int,
    min_tokens: int,
    batch_size: int = 512,
) -> tuple[pa.Table, dict[str, int]]:
    """Cut each document (+ EOS) into windows of ``seq_len`` tokens.

    Windows shorter than ``min_tokens`` (document tails, tiny documents) are dropped and
    counted in the returned stats, never silently. Returns the examples table
    (``EXAMPLE_SCHEMA``) and stats {examples, tokens, dropped_windows, dropped_tokens}.
    """
    eos, pad = special_ids(tokenizer)
    example_ids, out_docs, out_sources, chunks, n_tokens = [], [], [], [], []
    dropped_windows = dropped_tokens = 0
    for start in range(0, len(texts), batch_size):
        encodings = tokenizer.encode_batch(list(texts[start : start + batch_size]))
        for offset, encoding in enumerate(encodings):
            i = start + offset
            ids = [*encoding.ids, eos]
            for chunk_index, lo in enumerate(range(0, len(ids), seq_len)):
                window = ids[lo : lo + seq_len]
                if len(window) < min_tokens:
                    dropped_windows += 1
                    dropped_tokens += len(window)
                    continue
                example_ids.append(f"{doc_ids[i]}:{chunk_index}")
                out_docs.append(doc_ids[i])
                out_sources.append(sources[i])
                n_tokens.append(len(window))
                chunks.append(window + [pad] * (seq_len - len(window)))
    table = examples_table(example_ids, out_docs, out_sources, chunks, n_tokens, [1] * len(chunks))
    stats = {
        "examples": table.num_rows, "tokens": int(sum(n_tokens)),
        "dropped_windows": dropped_windows, "dropped_tokens": dropped_tokens,
    }
    return table, stats


def example_shards(
    tokenizer: Tokenizer,
    batches: Iterable[pa.RecordBatch | pa.Table],
    seq_len: int,
    min_tokens: int,
    shard_size: int,
    totals: dict[str, Any],
) -> Iterator[pa.Table]:
    """`chunk_documents` over a stream of document batches (columns doc_id, text, source),
    yielding shards of ``shard_size`` examples in document order (the last may be shorter):
    the same shards as chunking every document at once and slicing, with memory bounded by
    one batch and one shard whatever the corpus size.

    ``totals`` is filled as shards are yielded and complete once the generator is exhausted:
    the `chunk_documents` stats summed, plus ``per_source`` {source: {documents, examples,
    tokens}} (documents that kept at least one example)."""
    for key in ("examples", "tokens", "dropped_windows", "dropped_tokens"):
        totals[key] = 0
    per_source: dict[str, dict[str, int]] = {}
    totals["per_source"] = per_source
    pending: list[pa.Table] = []
    pending_rows = 0
    for batch in batches:
        table, stats = chunk_documents(
            tokenizer, batch.column("doc_id").to_pylist(), batch.column("text").to_pylist(),
            batch.column("source").to_pylist(), seq_len, min_tokens)
        for key, value in stats.items():
            totals[key] += value
        _count_per_source(table, per_source)
        pending.append(table)
        pending_rows += table.num_rows
        while pending_rows >= shard_size:
            buffered = pa.concat_tables(pending)
            yield buffered.slice(0, shard_size).combine_chunks()
            rest = buffered.slice(shard_size)
            pending, pending_rows = [rest], rest.num_rows
    if pending_rows:
        yield pa.concat_tables(pending).combine_chunks()


def _count_per_source(table: pa.Table, per_source: dict[str, dict[str, int]]) -> None:
    sources = table.column("source").to_pylist()
    docs = table.column("doc_id").to_pylist()
    n_tokens = table.column("n_tokens").to_pylist()
    seen: set[str] = set()  # a document's examples are all in this batch's table
    for source, doc, tokens in zip(sources, docs, n_tokens, strict=True):
        counts = per_source.setdefault(source, {"documents": 0, "examples": 0, "tokens": 0})
        counts["examples"] += 1
        counts["tokens"] += tokens
        if doc not in seen:
            seen.add(doc)
            counts["documents"] += 1


def encode_prompt_continuation(
    tokenizer: Tokenizer, prompts: Sequence[str], continuations: Sequence[str], seq_len: int
) -> tuple[list[list[int]], list[int], list[int], dict[str, int]]:
    """Token ids of prompt + continuation fitted into ``seq_len``; only continuation is scored.

    A continuation longer than half the window keeps its first ``seq_len // 2`` tokens (the
    loss is then measured on that prefix); the prompt is cut from the left to fill the rest,
    so the tokens nearest the continuation are kept. Returns (padded ids, n_tokens,
    score_from, {"truncated_prompts": .., "truncated_continuations": ..}).
    """
    _, pad = special_ids(tokenizer)
    prompt_enc = tokenizer.encode_batch(list(prompts))
    cont_enc = tokenizer.encode_batch(list(continuations))
    padded, n_tokens, score_from = [], [], []
    counts = {"truncated_prompts": 0, "truncated_continuations": 0}
    for i, (p, c) in enumerate(zip(prompt_enc, cont_enc, strict=True)):
        prompt_ids, cont_ids = p.ids, c.ids
        if not cont_ids:
            raise ValueError(f"target row {i}: empty continuation after tokenisation")
        if not prompt_ids:
            raise ValueError(f"target row {i}: empty prompt (a scored token needs context)")
        if len(cont_ids) > seq_len // 2:
            cont_ids = cont_ids[: seq_len // 2]
            counts["truncated_continuations"] += 1
        room = seq_len - len(cont_ids)
        if len(prompt_ids) > room:
            prompt_ids = prompt_ids[len(prompt_ids) - room :]
            counts["truncated_prompts"] += 1
        ids = prompt_ids + cont_ids
        padded.append(ids + [pad] * (seq_len - len(ids)))
        n_tokens.append(len(ids))
        score_from.append(len(prompt_ids))
    return padded, n_tokens, score_from, counts


EXAMPLE_SCHEMA = pa.schema([
    ("example_id", pa.string()),
    ("doc_id", pa.string()),
    ("source", pa.string()),
    ("n_tokens", pa.int32()),
    ("score_from", pa.int32()),
    ("input_ids", pa.list_(pa.int32())),
])


def examples_table(
    example_ids: Sequence[str],
    doc_ids: Sequence[str],
    sources: Sequence[str],
    input_ids: Sequence[Sequence[int]],
    n_tokens: Sequence[int],
    score_from: Sequence[int],
) -> pa.Table:
    """The one on-disk layout of tokenized examples (pool shards and target tasks alike)."""
    return pa.table(
        {
            "example_id": example_ids, "doc_id": doc_ids, "source": sources,
            "n_tokens": pa.array(n_tokens, pa.int32()),
            "score_from": pa.array(score_from, pa.int32()),
            "input_ids": pa.array(input_ids, pa.list_(pa.int32())),
        },
        schema=EXAMPLE_SCHEMA,
    )


def to_tensors(table: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids LongTensor [N, L], loss_mask BoolTensor [N, L]) from an examples table.

    ``loss_mask[i, t]`` is True when token t of example i is scored: ``score_from <= t <
    n_tokens`` (position 0 never is, padding never is).
    """
    column = table.column("input_ids").combine_chunks()
    seq_len = len(column[0]) if len(column) else 0
    flat = column.flatten().to_numpy(zero_copy_only=False)
    input_ids = torch.from_numpy(flat.astype(np.int64).reshape(len(column), seq_len))
    positions = torch.arange(seq_len).unsqueeze(0)
    n_tokens = torch.from_numpy(table.column("n_tokens").to_numpy().astype(np.int64)).unsqueeze(1)
    score_from = torch.from_numpy(table.column("score_from").to_numpy().astype(np.int64)).unsqueeze(1)
    loss_mask = (positions >= score_from.clamp(min=1)) & (positions < n_tokens)
    return input_ids, loss_mask


def decode_parts(tokenizer: Tokenizer, table: pa.Table) -> tuple[list[str], list[str]]:
    """(prompts, continuations) decoded from an examples table: tokens before ``score_from``
    and the scored tokens up to ``n_tokens``, as a model trained on the table sees them
    (a pool example has no prompt beyond its first token)."""
    ids = table.column("input_ids").to_pylist()
    ends = table.column("n_tokens").to_pylist()
    starts = [max(1, s) for s in table.column("score_from").to_pylist()]
    prompts = tokenizer.decode_batch([row[:s] for row, s in zip(ids, starts, strict=True)])
    rest = tokenizer.decode_batch([row[s:n] for row, s, n in zip(ids, starts, ends, strict=True)])
    return prompts, rest


def tokenizer_to_bytes(tokenizer: Tokenizer) -> bytes:
    return tokenizer.to_str().encode()


def tokenizer_from_bytes(data: bytes) -> Tokenizer:
    return Tokenizer.from_str(data.decode())


def tokenizer_summary(tokenizer: Tokenizer) -> dict[str, Any]:
    eos, pad = special_ids(tokenizer)
    return {"vocab_size": tokenizer.get_vocab_size(), "eos_id": eos, "pad_id": pad,
            "model": json.loads(tokenizer.to_str())["model"]["type"]}


def attention_mask(table: pa.Table) -> torch.Tensor:
    """[N, L] bool: True on each example's real tokens (the first ``n_tokens`` of its
    ``input_ids``), False on the padding."""
    n_tokens = torch.from_numpy(table.column("n_tokens").to_numpy().astype(np.int64))
    length = len(table.column("input_ids")[0])
    return torch.arange(length)[None, :] < n_tokens[:, None]


def decode_examples(tokenizer: Tokenizer, tables: Iterable[pa.Table]) -> list[str]:
    """The decoded text of every example (its first ``n_tokens`` ids) of examples tables,
    in order."""
    texts: list[str] = []
    for table in tables:
        ids = table.column("input_ids").to_pylist()
        texts.extend(tokenizer.decode_batch([row[:n] for row, n in zip(
            ids, table.column("n_tokens").to_pylist(), strict=True)]))
    return texts
