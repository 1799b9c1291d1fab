"""How alike the examples of a selection are, against random subsets of the same size: the
check behind any diversity-aware selection rule, which can only help a selection whose
examples crowd together more than random ones do.

    python bench/selection_redundancy.py                      # the bench store, proxy 0
    python bench/selection_redundancy.py --proxy 3 --summary bench/results/selection-redundancy.json

Reads a store that `bench/selection_quality.py` filled: one proxy's gradient features phi
[N, d] of the pool, the DsDm selection (`selected_subset`) and the random subsets
(`random_subset`). For each subset it reports, over its examples, the cosine to the nearest
other example of the same subset (mean, median, share above 0.9) and the mean pairwise
cosine, in two geometries: phi itself, and phi whitened by TRAK's kernel (psi = L^-1 phi,
K + lambda I = L L^T, lambda as the datamodel's), the metric in which the datamodel's scores
are inner products. Prints JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import emit, portable  # noqa: E402
from bench.tau_variants import STORE, only_manifest, tables  # noqa: E402
from dsdm import trak  # noqa: E402
from dsdm.artifacts import feature_shard, load_features  # noqa: E402
from dsdm.store import ArtifactStore  # noqa: E402


def crowding(x: torch.Tensor, rows: np.ndarray) -> dict[str, float]:
    """Nearest-neighbour and mean pairwise cosines among ``x[rows]`` (x [N, d] float32)."""
    z = x[torch.from_numpy(rows)]
    z = z / z.norm(dim=1, keepdim=True)
    cosine = z @ z.T
    cosine.fill_diagonal_(-2.0)
    nearest = cosine.max(1).values
    n = len(rows)
    pairwise = (float(z.sum(0).norm() ** 2) - n) / (n * (n - 1))
    return {"nearest_mean": round(float(nearest.mean()), 4),
            "nearest_median": round(float(nearest.median()), 4),
            "nearest_above_0.9": round(float((nearest > 0.9).float().mean()), 4),
            "pairwise_mean": round(pairwise, 5)}


def subset_rows(root: Path, asset: str, crawl: str, position: dict[str, int]) -> dict[str, np.ndarray]:
    """Pool rows of each folder of ``asset`` (selected_subset or random_subset), by folder."""
    out = {}
    for manifest in sorted((root / asset / crawl).glob("*/manifest.parquet")):
        ids = pq.read_table(manifest, columns=["example_id"]).column(0).to_pylist()
        out[f"{asset}/{manifest.parent.name}"] = np.array([position[i] for i in ids])
    if not out:
        raise SystemExit(f"{root / asset / crawl} holds no subset; materialise {asset} first")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=str(STORE))
    parser.add_argument("--crawl", default="bench-5200")
    parser.add_argument("--proxy", type=int, default=0, help="whose features (0-based)")
    parser.add_argument("--summary", help="write the JSON here too")
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = Path(args.store)
    store = ArtifactStore(str(root))
    corpus = tables(store, only_manifest(root, "tokenized_corpus", args.crawl), "examples")
    position = {e: i for i, e in enumerate(corpus.column("example_id").to_pylist())}
    grads = only_manifest(root, "gradient_shards", args.crawl)
    folder = f"gradient_shards/{args.crawl}/{grads['config_hash']}"
    started = time.time()
    phi = torch.cat([load_features(store, f"{folder}/{feature_shard(args.proxy, k)}").phi.float()
                     for k in range(grads["summary"]["shards"])])
    if len(phi) != len(position):
        raise SystemExit(f"proxy {args.proxy}'s features hold {len(phi)} rows, the pool {len(position)}")
    weights = only_manifest(root, "datamodel_weights", args.crawl)
    k_matrix = trak.kernel([phi])
    lam = trak.default_lambda(k_matrix, weights["config"]["lambda_relative"])
    factor = torch.linalg.cholesky(k_matrix + lam * torch.eye(len(k_matrix), dtype=k_matrix.dtype))
    psi = torch.linalg.solve_triangular(factor, phi.T.double(), upper=False).T.float()
    subsets = {**subset_rows(root, "selected_subset", args.crawl, position),
               **subset_rows(root, "random_subset", args.crawl, position)}
    size = min(len(rows) for rows in subsets.values())
    result = {name: {"examples": size,
                     "phi": crowding(phi, rows[:size]), "whitened": crowding(psi, rows[:size])}
              for name, rows in subsets.items()}
    config = {"store": portable(root.resolve()), "crawl": args.crawl, "proxy": args.proxy,
              "gradient_shards": grads["config_hash"], "lambda": lam,
              "seconds": round(time.time() - started, 1)}
    emit({"config": config, "subsets": result}, args.summary)


if __name__ == "__main__":
    main()
