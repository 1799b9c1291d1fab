"""The TRAK estimator of a linear datamodel, streamed over blocks of candidate features.

Notation (Park et al., 2023; Engstrom et al., 2024), for one proxy model m:
- Phi_m [N, d]: features phi(z_i) of the N candidates (rows), G_m [T, d]: features of the T
  targets, both made with the same projection P;
- K_m = Phi_m^T Phi_m + lambda I [d, d], the regularised kernel;
- scores_m = Phi_m K_m^{-1} G_m^T [N, T];
- q_m [N]: out-to-loss weights of the candidates, Q = diag(q);
- tau = mean_m(scores_m) * mean_m(q_m) (row-wise), the ensemble estimate [N, T]; without
  the out-to-loss weight, tau = mean_m(scores_m);
- optionally TRAK's sparsification, per target column j: S(tau)[i, j] = sign(tau[i, j]) *
  max(|tau[i, j]| - t_j, 0) with t_j = s x sd_i(tau[i, j]) (`soft_threshold`), so that a
  task's mean over its targets counts only the effects that stand out from each target's
  spread over the pool.

Sign convention (stated once for the engine): tau[i, j] > 0 means that including candidate i
in the training set is predicted to raise target j's margin f, i.e. lower its loss. DsDm keeps
the candidates with the largest scores. (One Newton step on the logistic loss gives the
change of f_j on including i as q_i g_j^T H^{-1} g_i; TRAK replaces H by Phi^T Phi + lambda I.)

Memory: `kernel` and `scores` consume iterables of [block, d] feature blocks, so peak memory
is O(d^2 + block x (d + T)), never O(N). Since scores are linear in G, a task's mean score over
its targets is obtained directly by passing the task's mean target feature as a single row.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

_KERNEL_TILE = 1024
"""Columns of Phi per tile of K. K is symmetric, so only the tiles on and above the diagonal
are multiplied and the rest is mirrored: 5/8 of a full product's flops at d = 4096."""


def kernel(phi_blocks: Iterable[torch.Tensor]) -> torch.Tensor:
    """Phi^T Phi [d, d] in float64, accumulated block by block ([block, d] each).

    Blocks may arrive in float32 (half the memory and I/O); each is widened to float64 before
    it is multiplied, so the sum over N rows is float64 throughout. A float32 running sum
    gathers rounding with every block (16% of lambda, in Frobenius norm, after ~1M rows of
    real features) and the inverse of K + lambda I amplifies it (condition number ~4e4);
    float64 costs ~1.3x with the triangular tiles (docs/PERFORMANCE.md).
    """
    total: torch.Tensor | None = None
    for block in phi_blocks:
        if block.ndim != 2:
            raise ValueError(f"feature blocks must be [block, d], got {tuple(block.shape)}")
        b = block.to(torch.float64)
        d = b.shape[1]
        if total is None:
            total = torch.zeros(d, d, dtype=torch.float64, device=b.device)
        elif d != total.shape[0]:
            raise ValueError(f"block has d={d}, earlier blocks d={total.shape[0]}")
        for i in range(0, d, _KERNEL_TILE):
            total[i : i + _KERNEL_TILE, i:].addmm_(b[:, i : i + _KERNEL_TILE].T, b[:, i:])
    if total is None:
        raise ValueError("no feature blocks given")
    d = total.shape[0]
    for i in range(0, d, _KERNEL_TILE):
        right = slice(i + _KERNEL_TILE, d)
        total[right, i : i + _KERNEL_TILE] = total[i : i + _KERNEL_TILE, right].T
    return total


LAMBDA_RELATIVE = 0.1
"""Default ridge as a multiple of mean(diag(K)). 1e-3..0.1 score alike and 0.1 is a little
the best once the LM head and embedding are featurised; from 1.0 up LDS falls
(docs/EVALUATION.md, ablations)."""


def default_lambda(k: torch.Tensor, relative: float = LAMBDA_RELATIVE) -> float:
    """lambda = relative x mean(diag(K)): scale-free, so a common rescaling of phi (e.g. the
    projection's normalisation) leaves the scores unchanged."""
    return relative * float(torch.diagonal(k).mean())


def regularised_inverse(k: torch.Tensor, lam: float | None = None) -> torch.Tensor:
    """(K + lambda I)^{-1} [d, d] float64 via a Cholesky factorisation.

    k: [d, d] symmetric PSD (e.g. from `kernel`); lam: ridge, default `default_lambda(k)`.
    Raises a ValueError if lam <= 0 or the matrix is not positive definite.
    """
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"K must be square, got {tuple(k.shape)}")
    k = k.to(torch.float64)
    lam = default_lambda(k) if lam is None else float(lam)
    if not lam > 0:
        raise ValueError(f"lambda must be positive (got {lam}); is the kernel all zeros?")
    reg = k.clone()  # + lambda I without two more [d, d] temporaries (eye and its multiple)
    reg.diagonal().add_(lam)
    chol, info = torch.linalg.cholesky_ex(reg)
    if int(info) != 0:
        raise ValueError(f"K + {lam:g} I is not positive definite; use a larger lambda")
    return torch.cholesky_inverse(chol)


def scores(
    phi_blocks: Iterable[torch.Tensor], k_inv: torch.Tensor, target_phi: torch.Tensor
) -> Iterator[torch.Tensor]:
    """Yields Phi_block K^{-1} G^T [block, T] (float64) for each candidate block [block, d].

    k_inv: [d, d] from `regularised_inverse`; target_phi: G [T, d]. K^{-1} G^T [d, T] is
    formed once, so each block costs one [block, d] x [d, T] product.
    """
    if target_phi.ndim != 2 or target_phi.shape[1] != k_inv.shape[0]:
        raise ValueError(
            f"target_phi must be [T, {k_inv.shape[0]}], got {tuple(target_phi.shape)}"
        )
    weights = k_inv.to(torch.float64) @ target_phi.to(torch.float64).T
    for block in phi_blocks:
        if block.ndim != 2 or block.shape[1] != weights.shape[0]:
            raise ValueError(f"feature block must be [block, {weights.shape[0]}], "
                             f"got {tuple(block.shape)}")
        yield block.to(torch.float64) @ weights


def ensemble(
    scores_per_model: Sequence[torch.Tensor], q_per_model: Sequence[torch.Tensor] | None
) -> torch.Tensor:
    """tau = mean_m(scores_m) * mean_m(q_m)[:, None]: [N, T] from M arrays [N, T] and M [N].

    ``q_per_model=None`` leaves the out-to-loss weight out: tau = mean_m(scores_m). Works on a
    block of candidates as well as on the whole pool (rows must align across m).
    """
    if not scores_per_model or (q_per_model is not None
                                and len(scores_per_model) != len(q_per_model)):
        raise ValueError("need one q vector per score matrix, and at least one of each")
    s = torch.stack([x.to(torch.float64) for x in scores_per_model]).mean(0)
    if s.ndim != 2:
        raise ValueError(f"scores must be [N, T], got {tuple(s.shape)}")
    if q_per_model is None:
        return s
    q = torch.stack([x.to(torch.float64) for x in q_per_model]).mean(0)
    if q.shape != s.shape[:1]:
        raise ValueError(f"scores [N, T] and q [N] disagree: {tuple(s.shape)}, {tuple(q.shape)}")
    return s * q[:, None]


SOFT_THRESHOLD = 1.0
"""Default soft threshold of each target's tau, in its standard deviations over the pool.
Decided on development targets held out of the scores: on the bench, under the source quotas,
1.0 lowered the loss on all five tasks and held-out text against raw tau (docs/EVALUATION.md,
ablations)."""


def column_spread(blocks: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sample standard deviation (n - 1) over all rows of each column: [T] float64 from a
    matrix given as row blocks [n_k, T], never holding more than one block.

    Blocks are merged by their means and sums of squared deviations (Chan et al.), which
    keeps the precision of a two-pass computation however the rows are split.
    """
    count, mean, squares = 0, None, None
    for block in blocks:
        b = block.to(torch.float64)
        if b.ndim != 2:
            raise ValueError(f"blocks must be [rows, T], got {tuple(b.shape)}")
        if mean is not None and b.shape[1] != mean.shape[0]:
            raise ValueError(f"block has {b.shape[1]} columns, earlier blocks {mean.shape[0]}")
        if b.shape[0] == 0:
            continue
        block_mean = b.mean(0)
        block_squares = ((b - block_mean) ** 2).sum(0)
        if mean is None:
            count, mean, squares = b.shape[0], block_mean, block_squares
            continue
        total = count + b.shape[0]
        delta = block_mean - mean
        mean = mean + delta * (b.shape[0] / total)
        squares = squares + block_squares + delta**2 * (count * b.shape[0] / total)
        count = total
    if count < 2:
        raise ValueError(f"a spread needs at least 2 rows, got {count}")
    return (squares / (count - 1)).sqrt()


def soft_threshold(tau: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """sign(tau) * max(|tau| - t, 0) per column: [N, T] (float64) from tau [N, T] and
    thresholds t [T] >= 0. Scores within t_j of zero become 0; larger ones shrink by t_j,
    so their order within a column is kept."""
    t = thresholds.to(torch.float64)
    if tau.ndim != 2 or t.shape != tau.shape[1:]:
        raise ValueError(f"tau [N, T] and thresholds [T] disagree: {tuple(tau.shape)}, "
                         f"{tuple(t.shape)}")
    if not bool((t >= 0).all()):
        raise ValueError("thresholds must be >= 0")
    x = tau.to(torch.float64)
    return torch.sign(x) * torch.clamp(x.abs() - t, min=0)
