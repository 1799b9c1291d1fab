"""The DsDm selection rule: weighted task scores -> ranked top-k under a budget.

Scores follow the sign convention of `dsdm.trak`: larger is better (including the candidate is
predicted to lower the target loss more), so the largest are kept. Ranking is deterministic:
ties in score are broken by a stable key (e.g. example_id), smaller key first.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

#: a selection with at least this share from one source (of a multi-source pool) is degenerate
DEGENERATE_SHARE = 0.9
#: what a selection keeps or drops: single examples, or whole documents
Unit = Literal["example", "document"]
#: how a document's score is made from its examples' scores (`document_ranking`)
DocumentScore = Literal["mean", "token_sum"]
#: how several tasks' scores become one (`combine_task_scores`)
TaskMixing = Literal["sum", "max"]


def combine_task_scores(
    task_scores: Mapping[str, ArrayLike], weights: Mapping[str, float] | None = None,
    *, standardise: bool = False, mixing: TaskMixing = "sum",
) -> np.ndarray:
    """One score per candidate [N] (float64) from its task scores, weights normalised:
    ``sum``: sum_task w_task * score_task;
    ``max``: max over the tasks of positive weight of w_task * score_task, plus
    w_task * score_task of each task to avoid (negative weight).

    task_scores: task name -> [N] (e.g. the mean of tau over the task's targets).
    weights: task name -> weight; None means equal weights; tasks left out of `weights` get
    weight 0. A negative weight marks a task to avoid: its scores count against a candidate,
    so examples predicted to lower that task's loss rank lower. Weights are normalised by the
    sum of their absolute values. Unknown names, non-finite weights and all-zero weights
    raise a ValueError.
    standardise: divide each task's scores by their standard deviation over the pool first.
    Raw scores are predicted loss changes, so a task whose loss the pool moves more dominates
    the sum (10x between the demo tasks); standardised, each task's ranking counts as its
    weight says. A task whose scores are all equal adds nothing.
    mixing: in a sum, tasks whose rankings agree outvote a task that ranks the pool
    differently, so that task's best examples are left out; with ``max`` a candidate counts
    for the task it serves best, so every task brings its own top examples in proportion to
    its weight (a round robin over the tasks' rankings when their scores are standardised).
    """
    normalised = normalised_weights(task_scores, weights)
    columns = {k: np.asarray(v, dtype=np.float64) for k, v in task_scores.items()}
    shapes = {k: c.shape for k, c in columns.items()}
    if len(set(shapes.values())) != 1 or any(c.ndim != 1 for c in columns.values()):
        raise ValueError(f"task score columns must be 1-D and of equal length, got {shapes}")
    if mixing not in ("sum", "max"):
        raise ValueError(f"task mixing must be 'sum' or 'max', got {mixing!r}")
    combined = np.zeros_like(next(iter(columns.values())))
    best = None  # the max rule's running max over the tasks of positive weight
    for name, w in normalised.items():
        if w != 0:
            column = columns[name]
            if standardise:
                spread = float(column.std())
                column = column / spread if spread > 0 else np.zeros_like(column)
            if mixing == "max" and w > 0:
                best = w * column if best is None else np.maximum(best, w * column)
            else:
                combined += w * column
    return combined if best is None else combined + best


def normalised_weights(
    task_scores: Mapping[str, ArrayLike], weights: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Task -> weight / sum of |weights|, for the weights `combine_task_scores` takes (None:
    equal weights over ``task_scores``' tasks); a ValueError for no tasks, unknown task
    names, non-finite or all-zero weights."""
    if not task_scores:
        raise ValueError("no task scores given")
    if weights is None:
        weights = dict.fromkeys(task_scores, 1.0)
    unknown = sorted(set(weights) - set(task_scores))
    if unknown:
        raise ValueError(f"weights name unknown tasks {unknown}; known: {sorted(task_scores)}")
    bad = {k: w for k, w in weights.items() if not math.isfinite(w)}
    if bad:
        raise ValueError(f"task weights must be finite numbers, got {bad}")
    total = float(sum(abs(w) for w in weights.values()))
    if total <= 0:
        raise ValueError(f"task weights are all zero ({dict(weights)}); give one a weight > 0")
    return {name: w / total for name, w in weights.items()}


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


@dataclass(frozen=True)
class DocumentRanking:
    """Per-document scores made from per-example ones (see `document_ranking`).

    doc_ids [D] unique, in order of first appearance in the pool; scores [D] float64; tokens
    [D] int64, the document's scored tokens; of_example [N] the document index of each example.
    """

    doc_ids: np.ndarray
    scores: np.ndarray
    tokens: np.ndarray
    of_example: np.ndarray

    def examples(self, documents: np.ndarray) -> np.ndarray:
        """Example indices of ``documents`` (indices into doc_ids), grouped document by
        document in the order given, each document's examples in pool order."""
        position = np.full(len(self.doc_ids), -1, dtype=np.int64)
        position[documents] = np.arange(len(documents))
        member = np.flatnonzero(position[self.of_example] >= 0)
        return member[np.argsort(position[self.of_example[member]], kind="stable")]


def document_ranking(
    scores: ArrayLike, doc_ids: ArrayLike, token_counts: ArrayLike, how: DocumentScore = "mean",
) -> DocumentRanking:
    """Aggregate example scores [N] into one score per document.

    - ``mean``: the token-weighted mean of the document's example scores, i.e. predicted gain
      per scored token. The datamodel is linear in examples, so a document's predicted effect
      is the sum of its examples'; under a token budget the greedy knapsack keeps the largest
      effect per token, which is this mean. A long document neither wins nor loses by length.
    - ``token_sum``: the token-weighted sum (sum of score x scored tokens): the document's
      whole predicted effect at its length, so long documents with positive scores come
      first. For budgets counted in documents, or when long documents are wanted.
    """
    s = np.asarray(scores, dtype=np.float64)
    tokens = np.asarray(token_counts, dtype=np.int64)
    docs = np.asarray(doc_ids)
    if s.ndim != 1 or docs.shape != s.shape or tokens.shape != s.shape:
        raise ValueError(f"scores, doc_ids and token_counts must be 1-D of equal length, got "
                         f"{s.shape}, {docs.shape}, {tokens.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} scores are NaN or infinite")
    if how not in ("mean", "token_sum"):
        raise ValueError(f"unknown document score {how!r}; use 'mean' or 'token_sum'")
    unique, first, of_example = np.unique(docs, return_index=True, return_inverse=True)
    appearance = np.argsort(first, kind="stable")  # sorted-unique -> first-appearance order
    relabel = np.empty_like(appearance)
    relabel[appearance] = np.arange(len(appearance))
    of_example = relabel[of_example]
    doc_tokens = np.bincount(of_example, weights=tokens, minlength=len(unique)).astype(np.int64)
    weighted = np.bincount(of_example, weights=s * tokens, minlength=len(unique))
    if how == "mean":
        # A document with no scored tokens has no predicted gain per token.
        doc_scores = np.divide(weighted, doc_tokens, out=np.zeros_like(weighted),
                               where=doc_tokens > 0)
    else:
        doc_scores = weighted
    return DocumentRanking(unique[appearance], doc_scores, doc_tokens, of_example)


def select_documents(ranking: DocumentRanking, token_budget: int) -> np.ndarray:
    """Indices of the kept documents [K] (best first): walk the documents by score (ties by
    doc id) and keep each whose tokens still fit; one that does not fit is skipped and smaller
    ones after it may still fit. So the kept tokens are <= budget, and no document left out
    fits in what remains. A budget below the smallest document raises a ValueError."""
    if token_budget <= 0:
        raise ValueError(f"token_budget must be a positive integer, got {token_budget}")
    smallest = int(ranking.tokens.min())
    if token_budget < smallest:
        raise ValueError(f"token budget {token_budget} is smaller than the smallest document "
                         f"({smallest} scored tokens): no whole document fits; raise the budget")
    order = rank(ranking.scores, ranking.doc_ids)
    sizes = ranking.tokens[order]
    left, kept = token_budget, []
    # Later documents only shrink what is left; stop once nothing remaining can fit.
    smallest_after = np.minimum.accumulate(sizes[::-1])[::-1]
    for position, size in enumerate(sizes.tolist()):
        if smallest_after[position] > left:
            break
        if size <= left:
            kept.append(position)
            left -= size
    return order[np.asarray(kept, dtype=np.int64)]


@dataclass(frozen=True)
class Selection:
    """What a selection rule kept: example indices [K] into the pool, in selection order
    (best unit first; a document's examples together, in pool order), and the score of the
    unit that kept each one [K] (the example's own, or its document's)."""

    order: np.ndarray
    unit_scores: np.ndarray
    unit: Unit


def select(
    scores: ArrayLike, keys: ArrayLike, token_counts: ArrayLike, *,
    unit: Unit = "example", doc_ids: ArrayLike | None = None, document_score: DocumentScore = "mean",
    fraction: float | None = None, token_budget: int | None = None,
) -> Selection:
    """Keep examples or whole documents under a budget (exactly one of fraction/token_budget).

    unit ``example``: `select_top` (fraction of the examples, or a token budget).
    unit ``document``: `document_ranking` + `select_documents`; ``fraction`` then means that
    share of the pool's scored tokens, so example and document selections of one fraction
    train on about the same number of tokens.
    """
    s = np.asarray(scores, dtype=np.float64)
    if unit == "example":
        order = select_top(s, keys, fraction=fraction, token_budget=token_budget,
                           token_counts=token_counts)
        return Selection(order, s[order], unit)
    if unit != "document":
        raise ValueError(f"unknown selection unit {unit!r}; use 'example' or 'document'")
    if doc_ids is None:
        raise ValueError("unit 'document' needs doc_ids")
    if (fraction is None) == (token_budget is None):
        raise ValueError("give exactly one of fraction= or token_budget=")
    counts = np.asarray(token_counts, dtype=np.int64)
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        token_budget = math.floor(fraction * int(counts.sum()))
    elif token_budget > int(counts.sum()):
        raise ValueError(f"token_budget {token_budget} exceeds the pool's {int(counts.sum())} "
                         "scored tokens; lower the budget or keep the whole pool with fraction=1.0")
    ranking = document_ranking(s, doc_ids, counts, document_score)
    documents = select_documents(ranking, int(token_budget))
    order = ranking.examples(documents)
    return Selection(order, ranking.scores[ranking.of_example[order]], unit)


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
