"""Why the TRAK kernel is accumulated in float64 while features are stored in float32.

    .venv/bin/python -m bench.precision                    # ~3-5 minutes on 2 CPU cores

Real features: every full 128-token window of the demo crawl (5,940) featurised at
d = 4,096 by the fast path under a demo proxy trained for `--train-steps` steps, plus the
select-split target rows. K = Phi^T Phi is formed from the same float32 features,
block by block as `dsdm.trak.kernel` streams them: summed in float64 (what the engine does)
and summed in float32, once over the pool and once over `--passes` copies of it (the
rounding of a running float32 sum grows with the number of blocks added, so the copies stand
in for a pool of ~1M rows). The JSON gives the spectrum of K + lambda I (lambda = 1% of the
mean diagonal, `trak.default_lambda`), the error of each float32 sum relative to lambda, and
how far the scores K^{-1} G^T and their rankings move when it replaces the float64 kernel.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--block-rows", type=int, default=1024)
    p.add_argument("--train-steps", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--passes", type=int, default=170,
                   help="copies of the pool summed in float32 (170 x 5,940 rows ~ 1M rows)")
    p.add_argument("--cache", help="npz file: reuse (or save) the featurised pool")
    args = p.parse_args()

    import numpy as np
    import torch

    from bench.common import proxy_config, real_examples, spearman
    from dsdm import trak
    from dsdm.features import FeatureConfig, featurize
    from dsdm.proxy import train_proxy

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.cache and Path(args.cache).exists():
        cached = np.load(args.cache)
        phi, target_phi = torch.from_numpy(cached["phi"]), torch.from_numpy(cached["target_phi"])
    else:
        ex = real_examples(vocab_size=4096, seq_len=128, n_pool=5940, n_targets=96)
        config = proxy_config("demo", vocab_size=4096, seq_len=128)
        model = train_proxy(config.model_copy(update={"max_steps": args.train_steps}),
                            ex.pool_ids[:2048], ex.pool_mask[:2048]).model
        features = FeatureConfig(target_dim=args.dim, batch_size=16)
        phi = featurize(model, ex.pool_ids, ex.pool_mask, features).phi
        target_phi = featurize(model, ex.target_ids, ex.target_mask, features,
                               attention_mask=ex.target_attention).phi
        if args.cache:
            np.savez(args.cache, phi=phi.numpy(), target_phi=target_phi.numpy())
    featurised = time.perf_counter() - start

    blocks = phi.split(args.block_rows)
    k64 = trak.kernel(blocks)
    lam = trak.default_lambda(k64)
    eig = torch.linalg.eigvalsh(k64 + lam * torch.eye(len(k64), dtype=k64.dtype))
    products = [b.T @ b for b in blocks]  # float32 [d, d] per block, as a float32 kernel has
    sums = {}
    for passes in (1, args.passes):
        # The running float32 sum over `passes` copies of the pool: the rounding that N rows
        # in blocks of `block_rows` would meet (the float64 sum of the copies is exact).
        k32 = torch.zeros_like(products[0])
        for _ in range(passes):
            for prod in products:
                k32 += prod
        sums[passes] = k32.double() / passes
    def scores_with(k: torch.Tensor) -> np.ndarray:
        (s,) = trak.scores([phi], trak.regularised_inverse(k.double(), lam), target_phi)
        return s.numpy()

    exact = scores_with(k64)
    report = {
        "setup": {**vars(args), "rows": len(phi), "targets": len(target_phi),
                  "d": int(phi.shape[1]), "featurise_seconds": round(featurised, 1)},
        "lambda_over_mean_diagonal": 0.01,
        "eigenvalues_of_k_plus_lambda": {
            "min": float(eig[0]), "median": float(eig[len(eig) // 2]), "max": float(eig[-1]),
            "condition_number": float(eig[-1] / eig[0])},
    }
    for passes, k32 in sums.items():
        err = k32 - k64
        single = scores_with(k32)
        per_target = [spearman(single[:, j], exact[:, j]) for j in range(exact.shape[1])]
        report[f"float32_running_sum_rows_{passes * len(phi)}"] = {
            "kernel_max_abs_error_over_lambda": float(err.abs().max() / lam),
            "kernel_frobenius_error_over_lambda": float(torch.linalg.matrix_norm(err) / lam),
            "scores_max_abs_error_over_max_abs_score":
                float(np.abs(single - exact).max() / np.abs(exact).max()),
            "scores_spearman_per_target_mean": round(float(np.mean(per_target)), 6),
            "scores_spearman_per_target_min": round(float(np.min(per_target)), 6)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
