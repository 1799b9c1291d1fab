"""A datamodel over domains: predict each target task's loss from a training mixture of the
pool's sources, choose the mixture, then rank examples within each source.

The example-level datamodel (TRAK) predicts the effect of small changes around the proxies'
random training subsets; a 20% selection is a large change, and most of its effect on a task
can be which sources it draws from (docs/EVALUATION.md, "A datamodel over domains"). This
module measures that effect directly, as regression mixture studies do:

1. `mixture_plan`: R training mixtures drawn around the pool's own source shares
   (Dirichlet with mean = pool shares), each turned into per-source counts (`allocate`).
2. The caller trains a small model on each and measures every task's select-split loss.
3. `fit_linear_mixture`: per task, loss ~ intercept + coef . shares (ridge, its penalty by
   leave-one-run-out error), the shares being the realised ones.
4. `choose_mixture`: among many candidate mixtures from the same prior (so the choice stays
   where the runs were measured), the mean of the ``top`` with the lowest predicted mean
   standardised loss over the tasks.
5. `quota_keys`: keys whose top ``budget`` holds each source's quota, best-ranked first
   within the source (by any example score: DsDm's, or random keys).

`quota_scores` is `quota_keys` that keeps the scores of the examples within quota.
`mixture_subset` draws a run's training subset; `mixture_quotas` does steps 3-4 and the
allocation in one call (the ``mixture_runs`` and ``selected_subset`` assets use both).

Shapes: S sources, R runs, T tasks. Shares sum to 1 over sources.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

MixtureObjective = Literal["mean", "worst", "per_task"]


def allocate(shares: np.ndarray, budget: int, available: np.ndarray) -> np.ndarray:
    """Integer counts [S] summing to ``budget``, proportional to ``shares`` [S] where a
    source holds enough examples (``available`` [S]); a capped source's excess goes to the
    others in proportion to their shares, repeatedly; rounding by largest remainder."""
    shares, available = np.asarray(shares, float), np.asarray(available, np.int64)
    if shares.shape != available.shape or (shares < 0).any() or shares.sum() <= 0:
        raise ValueError("shares must be non-negative, not all zero, one per source")
    if budget > available.sum():
        raise ValueError(f"budget {budget} exceeds the pool's {int(available.sum())} examples")
    target = np.zeros(len(shares))
    capped = np.zeros(len(shares), bool)
    left = float(budget)
    while True:
        weights = np.where(capped, 0.0, shares)
        if weights.sum() == 0:  # every positive-share source is full: spread over the rest
            weights = np.where(capped, 0.0, available.astype(float))
        target = np.where(capped, available, left * weights / weights.sum())
        over = ~capped & (target > available)
        if not over.any():
            break
        capped |= over
        left = budget - available[capped].sum()
    counts = np.floor(target).astype(np.int64)
    need = budget - int(counts.sum())
    # largest remainders first; a source with a remainder is below its cap, so it has room
    for s in np.argsort(-(target - counts), kind="stable")[:need]:
        counts[s] += 1
    return counts


def mixture_plan(pool_shares: np.ndarray, runs: int, concentration: float,
                 seed: int) -> np.ndarray:
    """[R, S] mixtures drawn from Dirichlet(concentration x pool_shares): centred on the pool,
    spread by 1 / concentration (a source of share p varies by ~sqrt(p (1 - p) / (c + 1)))."""
    rng = np.random.default_rng(seed)
    return rng.dirichlet(concentration * np.asarray(pool_shares, float), size=runs)


@dataclass(frozen=True)
class LinearMixtureModel:
    """Per-task linear prediction of loss from shares: loss[t] = intercept[t] + shares @ coef[:, t].

    ``scale`` [T]: the sd of each task's measured loss over the runs (its predictions are
    compared in those units, so no task's units dominate the mean)."""

    intercept: np.ndarray  # [T]
    coef: np.ndarray  # [S, T]
    scale: np.ndarray  # [T]
    r2: np.ndarray  # [T], in-sample
    r2_loo: np.ndarray  # [T], leave-one-run-out
    ridge: np.ndarray  # [T], the penalty each task's fit used

    def predict(self, shares: np.ndarray) -> np.ndarray:
        """[..., T] predicted losses of mixtures [..., S]."""
        return self.intercept + np.asarray(shares) @ self.coef


def _ridge(x: np.ndarray, y: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    mx, my = x.mean(0), y.mean(0)
    xc = x - mx
    coef = np.linalg.solve(xc.T @ xc + ridge * np.eye(x.shape[1]), xc.T @ (y - my))
    return my - mx @ coef, coef


RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _leave_one_out(x: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """[R, T] each run's losses predicted by the fit to the other runs."""
    held = np.empty_like(y)
    for r in range(len(x)):
        keep = np.arange(len(x)) != r
        b, c = _ridge(x[keep], y[keep], ridge)
        held[r] = b + x[r] @ c
    return held


def fit_linear_mixture(shares: np.ndarray, losses: np.ndarray,
                       ridge: float | None = None) -> LinearMixtureModel:
    """Ridge fit of ``losses`` [R, T] on realised ``shares`` [R, S] (centred, so the
    intercept is unpenalised). ``ridge=None`` picks each task's penalty from `RIDGE_GRID` by
    leave-one-run-out error (the runs are the only data: no evaluation split is involved).
    ``r2_loo``: the leave-one-run-out R^2 per task, the honest measure of whether the
    mixtures' effect on a task is larger than the runs' noise."""
    x, y = np.asarray(shares, float), np.asarray(losses, float)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"shares [R, S] and losses [R, T] disagree: {x.shape}, {y.shape}")
    if len(x) < 3:
        raise ValueError(f"a mixture model needs at least 3 runs, got {len(x)}")
    grid = RIDGE_GRID if ridge is None else (ridge,)
    held = {g: _leave_one_out(x, y, g) for g in grid}
    errors = np.stack([((y - held[g]) ** 2).sum(0) for g in grid])  # [G, T]
    best = errors.argmin(0)
    intercept, coef = np.empty(y.shape[1]), np.empty((x.shape[1], y.shape[1]))
    for t, g in enumerate(best):
        b, c = _ridge(x, y[:, t:t + 1], grid[g])
        intercept[t], coef[:, t] = b[0], c[:, 0]
    total = ((y - y.mean(0)) ** 2).sum(0)
    fitted = intercept + x @ coef
    return LinearMixtureModel(
        intercept=intercept, coef=coef, scale=y.std(0),
        r2=1 - ((y - fitted) ** 2).sum(0) / total,
        r2_loo=1 - errors[best, np.arange(y.shape[1])] / total,
        ridge=np.array([grid[g] for g in best]))


def choose_mixture(model: LinearMixtureModel, pool_shares: np.ndarray, available: np.ndarray,
                   budget: int, *, concentration: float, candidates: int = 20_000,
                   top: int = 100, weights: Sequence[float] | None = None,
                   objective: MixtureObjective = "mean", seed: int = 0) -> np.ndarray:
    """[S] shares of the chosen mixture: the mean of the ``top`` candidates (drawn from the
    runs' own prior, each realised by `allocate`'s caps) with the best objective over the
    tasks' predicted change from the pool's own mixture, in units of each task's sd over the
    runs: ``mean`` (weighted), ``worst`` (the largest change over the tasks, so no task is
    traded for the others) or ``per_task`` (the mean of each task's own choice: an equal
    share of the budget drawn with each task's best mix, the domain-level analogue of
    `task_mixing: max`). Averaging the top keeps the choice inside the region the runs
    measured rather than at the linear model's extreme corner.

    Only tasks the fit predicts (leave-one-run-out R^2 > 0) steer the choice: a task whose
    fit is noise keeps the pool's mixture (its share of ``per_task``; no weight in ``mean``
    and ``worst``), and when no task is predicted the pool's own shares are returned.
    Ranking candidates is blind to the size of the predictions, so without this a fit to
    noise would still move the mixture as far as a real effect does."""
    if objective not in ("mean", "worst", "per_task"):
        raise ValueError(f"unknown mixture objective {objective!r}; use 'mean', 'worst' or "
                         "'per_task'")
    pool_shares = np.asarray(pool_shares, float)
    w = np.ones(model.coef.shape[1]) if weights is None else np.asarray(weights, float)
    predicted = model.r2_loo > 0
    if not (predicted & (w != 0)).any():
        return pool_shares / pool_shares.sum()
    drawn = mixture_plan(pool_shares, candidates, concentration, seed)
    # realise the caps the way a selection will: a source cannot give more than it holds
    feasible = np.stack([allocate(d, budget, available) for d in drawn]) / budget
    change = (model.predict(feasible) - model.predict(pool_shares)) / model.scale

    def mean_of_best(value: np.ndarray) -> np.ndarray:
        return feasible[np.argsort(value, kind="stable")[:top]].mean(0)

    if objective == "per_task":  # each task's own best mix, the budget split evenly
        own = allocate(pool_shares, budget, available) / budget
        return np.mean([mean_of_best(column) if ok else own
                        for column, ok in zip(change.T, predicted, strict=True)], axis=0)
    if objective == "worst":
        return mean_of_best(change[:, predicted].max(1))
    w = np.where(predicted, w, 0.0)
    # by the sum of |weights|: a task to avoid (negative weight) must not flip the sign
    return mean_of_best(change @ (w / np.abs(w).sum()))


def mixture_quotas(shares: np.ndarray, losses: np.ndarray, available: np.ndarray, budget: int,
                   *, concentration: float, objective: MixtureObjective = "mean",
                   weights: Sequence[float] | None = None,
                   top: int = 100) -> tuple[np.ndarray, LinearMixtureModel]:
    """Per-source counts [S] (summing to ``budget``, each within ``available`` [S]) for a
    selection, from R measured runs (realised ``shares`` [R, S], ``losses`` [R, T]): the
    fit (`fit_linear_mixture`), the choice (`choose_mixture`, candidates from the runs'
    own Dirichlet prior around the pool; ``weights`` [T] for the ``mean`` objective) and
    its allocation; with the fit."""
    available = np.asarray(available, np.int64)
    model = fit_linear_mixture(shares, losses)
    chosen = choose_mixture(model, available / available.sum(), available, budget,
                            concentration=concentration, top=top, objective=objective,
                            weights=weights)
    return allocate(chosen, budget, available), model


def mixture_subset(sources: np.ndarray, counts: dict[str, int], seed: int) -> np.ndarray:
    """Sorted indices [sum(counts)] of a run's training subset: ``counts[source]`` examples
    drawn uniformly without replacement from each source of ``sources`` [N]."""
    sources = np.asarray(sources)
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([
        rng.choice(np.flatnonzero(sources == source), count, replace=False)
        for source, count in counts.items()]).astype(np.int64))


def quota_keys(sources: np.ndarray, scores: np.ndarray, quotas: dict[str, int]) -> np.ndarray:
    """[N] keys (larger kept first) whose top sum(quotas) holds exactly each source's quota,
    best ``scores`` first within a source: key = -(rank within the source + 1) / quota, so
    the members under quota have keys in [-1, 0) and everyone else below -1. A source with
    quota 0 gets -inf keys."""
    sources, scores = np.asarray(sources), np.asarray(scores, float)
    keys = np.full(len(scores), -np.inf)
    for source, quota in quotas.items():
        members = np.flatnonzero(sources == source)
        if quota > len(members):
            raise ValueError(f"quota {quota} for source {source!r} exceeds its {len(members)} examples")
        if quota <= 0:
            continue
        order = members[np.argsort(-scores[members], kind="stable")]
        keys[order] = -(np.arange(1, len(order) + 1)) / quota
    return keys


def quota_scores(sources: np.ndarray, scores: np.ndarray, quotas: dict[str, int]) -> np.ndarray:
    """[N] scores whose top sum(quotas) is exactly each source's quota of its best
    ``scores`` [N], like `quota_keys`, but an example within its quota keeps its own score
    (so a selection's stored scores and their explanations stay DsDm's), and every other
    example is placed below all of those, in `quota_keys` order (sources interleaved by
    quota); a source with quota 0 comes last."""
    keys = quota_keys(sources, scores, quotas)
    inside = keys >= -1
    out = np.asarray(scores, float).copy()
    if not inside.any() or inside.all():
        return out
    outside = keys[~inside]  # < -1, or -inf for a source without quota
    lowest = outside[np.isfinite(outside)].min(initial=-1.0)
    out[~inside] = out[inside].min() - 1.0 + np.where(np.isfinite(outside), outside, lowest - 1.0)
    return out
