"""The TRAK estimator of a linear datamodel, streamed over blocks of candidate features.

Notation (Park et al., 2023; Engstrom et al., 2024), for one proxy model m:
- Phi_m [N, d]: features phi(z_i) of the N candidates (rows), G_m [T, d]: features of the T
  targets, both made with the same projection P;
- K_m = Phi_m^T Phi_m + lambda I [d, d], the regularised kernel;
- scores_m = Phi_m K_m^{-1} G_m^T [N, T];
- q_m [N]: out-to-loss weights of the candidates, Q = diag(q);
- tau = mean_m(scores_m) * mean_m(q_m) (row-wise), the ensemble estimate [N, T]; without
  the out-to-loss weight, tau = mean_m(scores_m).

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
