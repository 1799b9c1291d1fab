"""What the benchmarks share: real examples made by the engine's own ingest and tokenisation
steps, the proxy shapes they run on, and peak-memory readings.

Benchmarks print JSON; they are not tests and assert nothing about speed.
"""

from __future__ import annotations

import gzip
import json
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the engine (polars, transformers, tokenizers) is imported where used,
    import torch  # so that bench/score.py's processes start small

    from dsdm.proxy import ProxyConfig

REPO = Path(__file__).resolve().parents[1]
DEMO_CRAWL = REPO / "data" / "crawls" / "demo"
DEMO_TASKS = REPO / "data" / "tasks"
TASKS = ("wiki_qa", "lambada_cloze", "tech_faq")

MODELS = {
    # The demo proxy of configs/demo.yaml: 1.4M parameters.
    "demo": {"hidden_size": 128, "num_layers": 2, "num_heads": 4},
    # ~7.6M parameters: the size of the earlier measurement that traker's figures come from.
    "7m": {"hidden_size": 256, "num_layers": 7, "num_heads": 4},
}


def emit(result: dict, path: str | None) -> None:
    """Print ``result`` as indented JSON and, given a ``path``, write the same text there."""
    text = json.dumps(result, indent=1)
    print(text)
    if path:
        Path(path).write_text(text + "\n")


def portable(value: object) -> object:
    """A flag as a result JSON records it: paths inside the repository relative to it, so the
    file says the same on every machine."""
    if not isinstance(value, Path):
        return value
    return str(value.relative_to(REPO)) if value.is_relative_to(REPO) else str(value)


@dataclass(frozen=True)
class Examples:
    """Token ids [N, L] and loss masks [N, L] of pool windows and of target-task rows."""

    pool_ids: torch.Tensor
    pool_mask: torch.Tensor
    target_ids: torch.Tensor
    target_mask: torch.Tensor
    target_attention: torch.Tensor
    """[T, L] bool: real (non-pad) tokens of the targets; pool windows are all full."""


def proxy_config(model: str, *, vocab_size: int, seq_len: int, batch_size: int = 32,
                 seed: int = 0) -> ProxyConfig:
    """The GPT-NeoX proxy named `model` (a key of `MODELS`)."""
    from dsdm.proxy import ProxyConfig

    if model not in MODELS:
        raise SystemExit(f"unknown model {model!r}; choose from {sorted(MODELS)}")
    return ProxyConfig(vocab_size=vocab_size, seq_len=seq_len, batch_size=batch_size, seed=seed,
                       **MODELS[model])


def real_examples(
    *, vocab_size: int, seq_len: int, n_pool: int, n_targets: int,
    crawl: Path = DEMO_CRAWL, tasks: Path = DEMO_TASKS,
) -> Examples:
    """Pool windows and target rows of the demo data, as the pipeline makes them.

    The crawl is ingested and a byte-level BPE of `vocab_size` is trained on it (seconds on
    the demo crawl); the pool is the first `n_pool` full `seq_len`-token windows, the targets
    the first `n_targets` select-split rows taken round-robin over the three tasks.
    Deterministic: same arguments, same tensors.
    """
    import polars as pl
    import torch

    from dsdm.ingest import ingest_crawl
    from dsdm.tasks import read_tasks, tokenize_tasks
    from dsdm.tokenization import TokenizerConfig, chunk_documents, to_tensors, train_bpe

    docs = ingest_crawl(str(crawl)).documents
    tokenizer = train_bpe(docs["text"].to_list(), TokenizerConfig(vocab_size=vocab_size))
    table, _ = chunk_documents(tokenizer, docs["doc_id"].to_list(), docs["text"].to_list(),
                               docs["source"].to_list(), seq_len, min_tokens=seq_len)
    if table.num_rows < n_pool:
        raise SystemExit(f"{crawl} gives {table.num_rows} full windows of {seq_len} tokens; "
                         f"asked for {n_pool}")
    pool_ids, pool_mask = to_tensors(table.slice(0, n_pool))

    frame = read_tasks(str(tasks), TASKS)
    frame = frame.filter(frame["split"] == "select")
    per_task = [frame.filter(frame["task"] == t) for t in TASKS]
    order = [f.row(i, named=True) for i in range(max(map(len, per_task)))
             for f in per_task if i < len(f)][:n_targets]
    if len(order) < n_targets:
        raise SystemExit(f"{tasks} has {len(order)} select rows; asked for {n_targets}")
    targets, _ = tokenize_tasks(tokenizer, pl.DataFrame(order), seq_len)
    target_ids, target_mask = to_tensors(targets)
    n_tokens = torch.from_numpy(targets.column("n_tokens").to_numpy().astype(np.int64))
    attention = torch.arange(seq_len)[None, :] < n_tokens[:, None]
    return Examples(pool_ids, pool_mask, target_ids, target_mask, attention)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two equally long vectors (ties are rare in float scores)."""
    ra = np.argsort(np.argsort(np.asarray(a, dtype=np.float64).ravel()))
    rb = np.argsort(np.argsort(np.asarray(b, dtype=np.float64).ravel()))
    return float(np.corrcoef(ra, rb)[0, 1])


def subset_crawl(source: Path, docs: int | None, folder: Path,
                 docs_per_part: int | None = None) -> Path:
    """A crawl folder with every k-th document of ``source`` (all sources kept), or all, in
    one part file or in parts of ``docs_per_part`` documents (as a crawler writes them).

    A part file that already holds exactly its documents is left as it is: `documents` keys
    its result on the crawl files' bytes, so rewriting one (gzip stamps the time) would make a
    re-run redo every asset. New parts are written with no timestamp, the same bytes each time."""
    rows = []
    for path in sorted(source.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            rows.extend(handle.readlines())
    if not rows:
        raise SystemExit(f"no documents under {source}; build the bench crawl: make bench-corpus")
    if docs is not None and docs < len(rows):
        step = len(rows) / docs
        rows = [rows[int(i * step)] for i in range(docs)]
    folder.mkdir(parents=True, exist_ok=True)
    per_part = docs_per_part or len(rows)
    for part, start in enumerate(range(0, len(rows), per_part)):
        path, text = folder / f"part-{part:05d}.jsonl.gz", "".join(rows[start:start + per_part])
        if path.exists() and gzip.decompress(path.read_bytes()).decode("utf-8") == text:
            continue
        path.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))
    (folder / "_SUCCESS").write_text("")
    return folder
