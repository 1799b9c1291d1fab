"""The DsDm selection rule: weighted task scores -> ranked top-k under a budget.

Scores follow the sign convention of `dsdm.trak`: larger is better (including the candidate is
predicted to lower the target loss more), so the largest are kept. Ranking is deterministic:
ties in score are broken by a stable key (e.g. example_id), smaller key first.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

#: a selection with at least this share from one source (of a multi-source pool) is degenerate
DEGENERATE_SHARE = 0.9


def combine_task_scores(
    task_scores: Mapping[str, ArrayLike], weights: Mapping[str, float] | None = None,
    *, standardise: bool = False,
) -> np.ndarray:
    """One score per candidate [N] (float64): sum_task w_task * score_task, weights normalised.

    task_scores: task name -> [N] (e.g. the mean of tau over the task's targets).
    weights: task name -> non-negative weight; None means equal weights; tasks left out of
    `weights` get weight 0. Unknown names, negative or non-finite weights, and all-zero
    weights raise a ValueError.
    standardise: divide each task's scores by their standard deviation over the pool first.
    Raw scores are predicted loss changes, so a task whose loss the pool moves more dominates
    the sum (10x between the demo tasks); standardised, each task's ranking counts as its
    weight says. A task whose scores are all equal adds nothing.
    """
    if not task_scores:
        raise ValueError("no task scores given")
    if weights is None:
        weights = dict.fromkeys(task_scores, 1.0)
    unknown = sorted(set(weights) - set(task_scores))
    if unknown:
        raise ValueError(f"weights name unknown tasks {unknown}; known: {sorted(task_scores)}")
    bad = {k: w for k, w in weights.items() if not (math.isfinite(w) and w >= 0)}
    if bad:
        raise ValueError(f"task weights must be finite and >= 0, got {bad}")
    total = float(sum(weights.values()))
    if total <= 0:
        raise ValueError(f"task weights are all zero ({dict(weights)}); give one a weight > 0")
    columns = {k: np.asarray(v, dtype=np.float64) for k, v in task_scores.items()}
    shapes = {k: c.shape for k, c in columns.items()}
    if len(set(shapes.values())) != 1 or any(c.ndim != 1 for c in columns.values()):
        raise ValueError(f"task score columns must be 1-D and of equal length, got {shapes}")
    combined = np.zeros_like(next(iter(columns.values())))
    for name, w in weights.items():
        if w > 0:
            column = columns[name]
            if standardise:
                spread = float(column.std())
                column = column / spread if spread > 0 else np.zeros_like(column)
            combined += (w / total) * column
    return combined


def rank(scores: ArrayLike, keys: ArrayLike) -> np.ndarray:
    """Indices [N] ordering candidates by score descending, ties by key ascending.

    scores: [N] finite; keys: [N] unique sortable values (ints or strings, e.g. example_id).
    """
    s = np.asarray(scores, dtype=np.float64)
    k = np.asarray(keys)
    if s.ndim != 1 or k.shape != s.shape:
        raise ValueError(f"scores and keys must be 1-D of equal length, got {s.shape}, {k.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} scores are NaN or infinite")
    if len(np.unique(k)) != len(k):
        raise ValueError("tie-break keys must be unique (e.g. example ids)")
    # lexsort sorts by the last key first: primary -score, secondary key.
    return np.lexsort((k, -s))


def select_top(
    scores: ArrayLike,
    keys: ArrayLike,
    *,
    fraction: float | None = None,
    token_budget: int | None = None,
    token_counts: ArrayLike | None = None,
) -> np.ndarray:
    """Ranked indices of the kept candidates (best first).

    Exactly one of:
    - `fraction` in (0, 1]: keep floor(fraction x N) candidates (at least one);
    - `token_budget` with `token_counts` [N] (scored tokens per candidate): walk the ranking
      and keep candidates while the running token sum stays <= budget; stop at the first that
      does not fit, so the kept set is always a prefix of the ranking.
    """
    order = rank(scores, keys)
    n = len(order)
    if (fraction is None) == (token_budget is None):
        raise ValueError("give exactly one of fraction= or token_budget=")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        k = math.floor(fraction * n)
        if k == 0:
            raise ValueError(
                f"fraction {fraction} of {n} candidates keeps none; use at least {1 / n:.3g}"
            )
        return order[:k]
    if token_counts is None:
        raise ValueError("token_budget needs token_counts (scored tokens per candidate)")
    counts = np.asarray(token_counts, dtype=np.int64)
    if counts.shape != (n,) or (counts < 0).any():
        raise ValueError(f"token_counts must be [N={n}] non-negative integers")
    pool_tokens = int(counts.sum())
    if token_budget is None or token_budget <= 0:
        raise ValueError(f"token_budget must be a positive integer, got {token_budget}")
    if token_budget > pool_tokens:
        raise ValueError(
            f"token_budget {token_budget} exceeds the pool's {pool_tokens} scored tokens; "
            "lower the budget or keep the whole pool with fraction=1.0"
        )
    running = np.cumsum(counts[order])
    k = int(np.searchsorted(running, token_budget, side="right"))
    if k == 0:
        raise ValueError(
            f"token_budget {token_budget} is smaller than the top-ranked candidate "
            f"({int(counts[order[0]])} tokens); raise it to at least that"
        )
    return order[:k]


def dominant_source(selected_sources: Sequence[str], pool_sources: Sequence[str]) -> dict:
    """The source with the largest share of a selection, and its share of selection and pool.

    ``degenerate`` is true when the pool offers several sources but the selection is almost
    all one of them, a sign that the scores track a source artefact (length, boilerplate)
    rather than usefulness; ``DEGENERATE_SHARE`` sets "almost all".
    """
    if not selected_sources:
        raise ValueError("empty selection")
    counts = Counter(selected_sources)
    source, count = max(sorted(counts.items()), key=lambda item: item[1])
    share = count / len(selected_sources)
    pool = Counter(pool_sources)
    return {"source": source, "selected_share": share,
            "pool_share": pool[source] / max(len(pool_sources), 1),
            "degenerate": len(pool) > 1 and share >= DEGENERATE_SHARE}
