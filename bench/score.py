"""Scoring at scale: TRAK scores of a synthetic 1,000,000 x 4,096 feature matrix against
1,000 targets with `dsdm.trak`, streamed in blocks, in bounded memory.

    .venv/bin/python -m bench.score                           # 1M rows, blocks of 4,096 and 32,768
    .venv/bin/python -m bench.score --rows 100000 --block-rows 8192

The feature matrix is never held: each chunk of 1,024 rows is drawn from its own seeded
generator (`derive_seed(seed, "chunk/c")`), so every block size sees the same matrix, once for
the kernel pass and again, identically, for the scoring pass, as the pipeline reads its feature shards twice. Blocks are float32 (as shards
are stored); `trak.kernel` widens each to float64 before accumulating K = Phi^T Phi, and
`trak.scores` yields float64 [block, T] scores, which are reduced to each candidate's mean
tau over the targets and dropped. Each block size runs in its own child process so that
its peak RSS (ru_maxrss) is its own.

Memory bound: O(d^2 + block x (d + T)); `model_mb` spells out the terms:
4 d^2 float64 (K, K + lambda I, its Cholesky factor, the inverse: the most alive at once, in
`regularised_inverse`), 2 d T float64 (G widened, K^{-1} G^T), block x d x (4 + 8) (a float32
block and its float64 copy), 3 block x T float64 (scores, tau, the product), and N float64
means. The time is O(N d^2) for the kernel plus O(N d T) for the scores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

CHUNK = 1024
"""Rows drawn from one seeded generator; block sizes must be multiples of it."""


def model_mb(rows: int, dim: int, targets: int, block: int) -> float:
    """The memory bound's terms, in MiB (see the module docstring)."""
    floats64 = 4 * dim * dim + 2 * dim * targets + 3 * block * targets + rows
    return (8 * floats64 + block * dim * (4 + 8)) / 2**20


def run(args: argparse.Namespace, block_rows: int) -> dict:
    """One full kernel + inverse + scoring pass with blocks of `block_rows` rows."""
    import torch

    from bench.common import peak_rss_mb
    from dsdm import trak
    from dsdm.projection import derive_seed

    torch.set_num_threads(args.threads)
    rss_at_start = peak_rss_mb()
    timings = {"generate": 0.0}
    cpu = {"generate": 0.0}

    def blocks():
        for start in range(0, args.rows, block_rows):
            t0, c0 = time.perf_counter(), time.process_time()
            n = min(block_rows, args.rows - start)
            block, q = torch.empty(n, args.dim), torch.empty(n)
            for lo in range(0, n, CHUNK):
                # Chunk c is the same whatever the block size: same matrix for every run.
                c = (start + lo) // CHUNK
                gen = torch.Generator().manual_seed(derive_seed(args.seed, f"chunk/{c}"))
                rows = block[lo : lo + CHUNK].normal_(generator=gen)
                # Rows of unequal norm, like real gradients; float32, as shards are stored.
                rows.mul_(torch.rand(len(rows), 1, generator=gen).add_(0.5))
                q[lo : lo + CHUNK].uniform_(generator=gen)
            timings["generate"] += time.perf_counter() - t0
            cpu["generate"] += time.process_time() - c0
            yield block, q

    gen = torch.Generator().manual_seed(derive_seed(args.seed, "targets"))
    target_phi = torch.randn(args.targets, args.dim, generator=gen)
    start, cpu_start = time.perf_counter(), time.process_time()
    k = trak.kernel(b for b, _ in blocks())
    timings["kernel"] = time.perf_counter() - start - timings["generate"]
    cpu["kernel"] = time.process_time() - cpu_start - cpu["generate"]
    t0, c0 = time.perf_counter(), time.process_time()
    k_inv = trak.regularised_inverse(k)
    del k
    timings["inverse"] = time.perf_counter() - t0
    cpu["inverse"] = time.process_time() - c0
    generated, cpu_generated = timings["generate"], cpu["generate"]
    t0, c0 = time.perf_counter(), time.process_time()
    mean_tau = torch.empty(args.rows, dtype=torch.float64)
    pending_q: deque[torch.Tensor] = deque()

    def phi_of_blocks():
        for b, q in blocks():
            pending_q.append(q)
            yield b

    row = 0
    for s in trak.scores(phi_of_blocks(), k_inv, target_phi):
        tau = trak.ensemble([s], [pending_q.popleft()])
        mean_tau[row : row + len(tau)] = tau.mean(1)
        row += len(tau)
    timings["scores"] = time.perf_counter() - t0 - (timings["generate"] - generated)
    cpu["scores"] = time.process_time() - c0 - (cpu["generate"] - cpu_generated)
    total = time.perf_counter() - start
    return {
        "block_rows": block_rows,
        "seconds": round(total, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "seconds_by_phase": {name: round(v, 1) for name, v in timings.items()},
        "cpu_seconds_by_phase": {name: round(v, 1) for name, v in cpu.items()},
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_at_start_mb": round(rss_at_start, 1),
        "model_mb": round(model_mb(args.rows, args.dim, args.targets, block_rows), 1),
        "rows_scored": row,
        "mean_tau_checksum": float(mean_tau.sum()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="candidates N")
    p.add_argument("--dim", type=int, default=4096, help="feature dimension d")
    p.add_argument("--targets", type=int, default=1000, help="targets T")
    p.add_argument("--block-rows", default="4096,32768",
                   help="comma-separated block sizes, one child process each")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 leaves a core to others on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run(args, args.child)))
        return
    blocks = [int(b) for b in args.block_rows.split(",")]
    if any(b <= 0 or b % CHUNK for b in blocks):
        raise SystemExit(f"--block-rows must be positive multiples of {CHUNK}, got {blocks}")
    results = []
    load_before = os.getloadavg()[0]
    for block in blocks:
        print(f"scoring with blocks of {block} rows ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "bench.score", *sys.argv[1:], "--child", str(block)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              cwd=Path(__file__).resolve().parents[1])
        if done.returncode != 0:
            raise SystemExit(f"block size {block} failed:\n{done.stderr[-4000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # kept if later ones fail
    import torch

    report = {
        "setup": {k: v for k, v in vars(args).items() if k != "child"},
        "machine": {"cores": os.cpu_count(), "torch": torch.__version__,
                    "load_average_1m_before_after": [round(load_before, 2),
                                                     round(os.getloadavg()[0], 2)]},
        "memory_bound": "O(d^2 + block x (d + T)) + N means; model_mb adds up its terms",
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
