"""Our DSIR against the `data-selection` package's HashedNgramDSIR on the same documents.

    python bench/dsir.py                      # the bench crawl (.dsdm/bench), all documents
    python bench/dsir.py --docs 5000          # a quick run
    python bench/dsir.py --crawl data/crawls/demo --tasks data/tasks

Both fit a 10k-bucket unigram+bigram model of the target text (the select split of the
target tasks, prompt + continuation) and of the pool, and compute every document's log
importance weight. The package runs with 2 processes (this machine's cores); ours is
vectorised in one process. Both timings include reading the same JSON lines. Prints one JSON
object: documents, MB, seconds and MB/s of each, the speed ratio, and the Spearman
correlation of the two sets of log importance weights (hash functions differ, so bucket
collisions differ; the weights should still rank documents alike). Needs the bench extra:
pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsdm.baselines import PoolData  # noqa: E402
from dsdm.baselines.dsir import DsirSelection  # noqa: E402
from dsdm.evaluation import spearman  # noqa: E402

TASKS = ("wiki_qa", "lambada_cloze", "tech_faq")


def read_documents(crawl: Path, limit: int | None) -> list[str]:
    texts: list[str] = []
    for path in sorted(crawl.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            texts.extend(json.loads(line)["text"] for line in handle)
        if limit is not None and len(texts) >= limit:
            return texts[:limit]
    if not texts:
        raise SystemExit(f"no *.jsonl.gz documents under {crawl}; build it: make bench-corpus")
    return texts


def read_targets(tasks: Path) -> list[str]:
    texts = []
    for name in TASKS:
        with gzip.open(tasks / f"{name}.jsonl.gz", "rt", encoding="utf-8") as handle:
            texts.extend(r["prompt"] + r["continuation"] for r in map(json.loads, handle)
                         if r["split"] == "select")
    return texts


def write_jsonl(path: Path, texts: list[str]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}) + "\n")


def run_reference(raw: list[Path], target: Path, cache: Path, procs: int) -> np.ndarray:
    from data_selection import HashedNgramDSIR

    dsir = HashedNgramDSIR(raw_datasets=[str(p) for p in raw], target_datasets=[str(target)],
                           cache_dir=str(cache), num_proc=procs, num_buckets=10_000, ngrams=2)
    dsir.fit_importance_estimator(num_tokens_to_fit="all")
    dsir.compute_importance_weights()
    return np.concatenate([np.load(cache / "log_importance_weights" / f"{i}.npy") for i in range(len(raw))])


def run_ours(raw: list[Path], target: Path) -> np.ndarray:
    def load(path: Path) -> list[str]:
        with path.open(encoding="utf-8") as handle:
            return [json.loads(line)["text"] for line in handle]

    texts = [t for p in raw for t in load(p)]
    return DsirSelection(gumbel=False).log_importance_weights(PoolData(texts, load(target)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crawl", type=Path, default=REPO / ".dsdm" / "bench" / "crawls" / "bench")
    parser.add_argument("--tasks", type=Path, default=REPO / ".dsdm" / "bench" / "tasks")
    parser.add_argument("--docs", type=int, default=None, help="use the first N documents")
    parser.add_argument("--procs", type=int, default=2, help="processes for the reference")
    args = parser.parse_args()

    texts = read_documents(args.crawl, args.docs)
    targets = read_targets(args.tasks)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        half = len(texts) // 2  # one raw file per reference process keeps document order
        raw = [folder / "raw-0.jsonl", folder / "raw-1.jsonl"]
        write_jsonl(raw[0], texts[:half])
        write_jsonl(raw[1], texts[half:])
        target = folder / "target.jsonl"
        write_jsonl(target, targets)
        megabytes = sum(p.stat().st_size for p in raw) / 1e6

        start = time.perf_counter()
        ours = run_ours(raw, target)
        ours_s = time.perf_counter() - start
        start = time.perf_counter()
        reference = run_reference(raw, target, folder / "cache", args.procs)
        reference_s = time.perf_counter() - start

    print(json.dumps({
        "documents": len(texts), "target_texts": len(targets), "megabytes": round(megabytes, 1),
        "ours_s": round(ours_s, 2), "ours_mb_per_s": round(megabytes / ours_s, 2),
        "reference_s": round(reference_s, 2), "reference_procs": args.procs,
        "reference_mb_per_s": round(megabytes / reference_s, 2),
        "speedup": round(reference_s / ours_s, 1),
        "spearman_log_weights": round(spearman(ours, reference), 4),
        "top10pct_overlap": round(_top_overlap(ours, reference, 0.1), 4),
    }, indent=2))


def _top_overlap(a: np.ndarray, b: np.ndarray, share: float) -> float:
    k = max(1, int(share * len(a)))
    return len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k


if __name__ == "__main__":
    main()
