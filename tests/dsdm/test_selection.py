"""The selection rule: task weighting, deterministic ranking, fraction and token budgets."""

from __future__ import annotations

import numpy as np
import pytest

from dsdm.selection import (
    combine_task_scores,
    document_ranking,
    dominant_source,
    rank,
    select,
    select_documents,
    select_top,
)


def test_combine_normalises_weights() -> None:
    scores = {"qa": np.array([1.0, 0.0, 2.0]), "code": np.array([0.0, 4.0, 2.0])}
    combined = combine_task_scores(scores, {"qa": 3.0, "code": 1.0})
    np.testing.assert_allclose(combined, [0.75, 1.0, 2.0])
    np.testing.assert_allclose(combine_task_scores(scores), [0.5, 2.0, 2.0])
    # a task left out of the weights counts for nothing
    np.testing.assert_allclose(combine_task_scores(scores, {"qa": 2.0}), scores["qa"])


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"qa": 1.0, "math": 1.0}, "unknown tasks \\['math'\\]"),
        ({"qa": float("nan")}, "finite numbers"),
        ({"qa": float("-inf"), "code": 1.0}, "finite numbers"),
        ({"qa": 0.0, "code": 0.0}, "all zero"),
    ],
)
def test_combine_validates_weights(weights: dict[str, float], message: str) -> None:
    scores = {"qa": np.zeros(3), "code": np.ones(3)}
    with pytest.raises(ValueError, match=message):
        combine_task_scores(scores, weights)


def test_combine_validates_columns() -> None:
    with pytest.raises(ValueError, match="equal length"):
        combine_task_scores({"a": np.zeros(3), "b": np.zeros(4)})
    with pytest.raises(ValueError, match="no task scores"):
        combine_task_scores({})


def test_rank_breaks_ties_by_key_deterministically() -> None:
    scores = np.array([0.5, 0.9, 0.5, 0.9, 0.1])
    keys = np.array(["e", "d", "c", "b", "a"])
    order = rank(scores, keys)
    assert order.tolist() == [3, 1, 2, 0, 4]
    # The same candidates in another order rank the same way (by key, not by position).
    perm = np.array([4, 2, 0, 3, 1])
    assert keys[perm][rank(scores[perm], keys[perm])].tolist() == keys[order].tolist()


def test_rank_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="NaN"):
        rank(np.array([1.0, np.nan]), np.array([1, 2]))
    with pytest.raises(ValueError, match="unique"):
        rank(np.array([1.0, 2.0]), np.array([1, 1]))


def test_fraction_mode() -> None:
    scores = np.arange(10, dtype=float)
    kept = select_top(scores, np.arange(10), fraction=0.35)
    assert kept.tolist() == [9, 8, 7]
    assert len(select_top(scores, np.arange(10), fraction=1.0)) == 10
    with pytest.raises(ValueError, match="keeps none"):
        select_top(scores, np.arange(10), fraction=0.05)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        select_top(scores, np.arange(10), fraction=1.5)


def test_token_budget_is_respected_exactly() -> None:
    rng = np.random.default_rng(0)
    scores, counts = rng.normal(size=200), rng.integers(1, 128, size=200)
    keys = np.arange(200)
    for budget in [128, 1000, 5000, int(counts.sum())]:
        kept = select_top(scores, keys, token_budget=budget, token_counts=counts)
        order = rank(scores, keys)
        assert kept.tolist() == order[: len(kept)].tolist()  # a prefix of the ranking
        assert counts[kept].sum() <= budget
        if len(kept) < 200:  # the next candidate would not have fit
            assert counts[kept].sum() + counts[order[len(kept)]] > budget
    exact = select_top(np.array([3.0, 2.0, 1.0]), keys[:3], token_budget=30,
                       token_counts=np.array([10, 20, 5]))
    assert exact.tolist() == [0, 1]


def test_impossible_budgets_say_what_to_do() -> None:
    scores, keys, counts = np.array([2.0, 1.0]), np.array([0, 1]), np.array([100, 10])
    with pytest.raises(ValueError, match="smaller than the top-ranked candidate \\(100 tokens\\)"):
        select_top(scores, keys, token_budget=50, token_counts=counts)
    with pytest.raises(ValueError, match="exceeds the pool's 110"):
        select_top(scores, keys, token_budget=111, token_counts=counts)
    with pytest.raises(ValueError, match="positive"):
        select_top(scores, keys, token_budget=0, token_counts=counts)
    with pytest.raises(ValueError, match="needs token_counts"):
        select_top(scores, keys, token_budget=10)
    with pytest.raises(ValueError, match="exactly one"):
        select_top(scores, keys, fraction=0.5, token_budget=10, token_counts=counts)


def test_dominant_source_flags_a_one_source_selection_of_a_mixed_pool(demo_rows) -> None:
    pool = [r["source"] for r in demo_rows]
    wiki = [s for s in pool if s == "wikipedia"]
    mostly_wiki = wiki[:95] + ["recipes"] * 5
    mix = dominant_source(mostly_wiki, pool)
    assert mix["source"] == "wikipedia" and mix["degenerate"]
    assert mix["selected_share"] == 0.95
    assert mix["pool_share"] == len(wiki) / len(pool)
    assert not dominant_source(pool[::5], pool)["degenerate"]  # the demo's own mix
    assert not dominant_source(wiki, wiki)["degenerate"]  # a one-source pool cannot do better
    with pytest.raises(ValueError, match="empty selection"):
        dominant_source([], pool)


def test_standardised_mixing_lets_each_task_count_equally() -> None:
    rng = np.random.default_rng(0)
    small, large = rng.normal(size=1000) * 1e-5, rng.normal(size=1000) * 1e-3
    raw = combine_task_scores({"small": small, "large": large})
    std = combine_task_scores({"small": small, "large": large}, standardise=True)
    assert np.corrcoef(raw, large)[0, 1] > 0.999  # raw: the large-scale task decides
    np.testing.assert_allclose(std, 0.5 * small / small.std() + 0.5 * large / large.std())
    assert abs(np.corrcoef(std, small)[0, 1] - np.corrcoef(std, large)[0, 1]) < 0.05
    flat = combine_task_scores({"flat": np.ones(4), "x": np.arange(4.0)}, standardise=True)
    np.testing.assert_allclose(flat, 0.5 * np.arange(4.0) / np.arange(4.0).std())


def test_max_mixing_counts_each_candidate_for_its_best_task() -> None:
    scores = {"qa": np.array([1.0, 0.0, 2.0, 0.5]), "code": np.array([0.0, 4.0, 2.0, 0.5])}
    # weights 3:1 -> 0.75, 0.25: max(0.75 qa, 0.25 code)
    combined = combine_task_scores(scores, {"qa": 3.0, "code": 1.0}, mixing="max")
    np.testing.assert_allclose(combined, [0.75, 1.0, 1.5, 0.375])
    # a task to avoid is subtracted from the best part, as in the sum
    avoid = {**scores, "spam": np.array([1.0, 0.0, 4.0, 0.0])}
    np.testing.assert_allclose(
        combine_task_scores(avoid, {"qa": 1.0, "code": 1.0, "spam": -2.0}, mixing="max"),
        [0.25 - 0.5, 1.0, 0.5 - 2.0, 0.125])
    # only tasks to avoid: the avoided parts alone
    np.testing.assert_allclose(combine_task_scores(avoid, {"spam": -1.0}, mixing="max"),
                               -avoid["spam"])
    with pytest.raises(ValueError, match="'sum' or 'max', got 'mean'"):
        combine_task_scores(scores, mixing="mean")


def test_max_mixing_gives_a_dissenting_task_its_own_top_examples() -> None:
    # two tasks that rank the pool alike and one that ranks it differently: the sum keeps
    # what the two agree on, max keeps each task's own best in equal measure
    rng = np.random.default_rng(0)
    shared, other = rng.normal(size=2000), rng.normal(size=2000)
    scores = {"a": shared + 0.1 * rng.normal(size=2000), "b": shared + 0.1 * rng.normal(size=2000),
              "c": other}
    k = 200
    own_top = set(np.argsort(-other)[:k // 3].tolist())
    for mixing, least in (("sum", 0.0), ("max", 0.95)):
        kept = set(np.argsort(-combine_task_scores(scores, standardise=True, mixing=mixing))[:k].tolist())
        assert len(kept & own_top) / len(own_top) >= least, mixing
    kept_sum = set(np.argsort(-combine_task_scores(scores, standardise=True))[:k].tolist())
    assert len(kept_sum & own_top) / len(own_top) < 0.5


def test_a_negative_weight_counts_a_task_against_a_candidate() -> None:
    scores = {"qa": np.array([1.0, 0.0, 2.0]), "spam": np.array([0.0, 4.0, 2.0])}
    combined = combine_task_scores(scores, {"qa": 3.0, "spam": -1.0})
    # normalised by the sum of absolute weights: 0.75 qa - 0.25 spam
    np.testing.assert_allclose(combined, [0.75, -1.0, 1.0])
    assert rank(combined, np.arange(3)).tolist() == [2, 0, 1]
    std = combine_task_scores(scores, {"qa": 1.0, "spam": -1.0}, standardise=True)
    np.testing.assert_allclose(std, 0.5 * scores["qa"] / scores["qa"].std()
                               - 0.5 * scores["spam"] / scores["spam"].std())


def _brute_force_documents(doc_score: dict, doc_tokens: dict, budget: int) -> list:
    """The documented rule, written out: best first, skip what does not fit."""
    kept, left = [], budget
    for doc in sorted(doc_score, key=lambda d: (-doc_score[d], d)):
        if doc_tokens[doc] <= left:
            kept.append(doc)
            left -= doc_tokens[doc]
    return kept


def test_document_scores_are_token_weighted_means_or_sums() -> None:
    scores = np.array([1.0, 3.0, 2.0, -1.0, 5.0])
    docs = np.array(["b", "b", "a", "a", "c"])
    tokens = np.array([100, 50, 10, 30, 0])
    ranking = document_ranking(scores, docs, tokens, "mean")
    assert ranking.doc_ids.tolist() == ["b", "a", "c"]  # first appearance in the pool
    np.testing.assert_allclose(ranking.scores, [(100 + 150) / 150, (20 - 30) / 40, 0.0])
    assert ranking.tokens.tolist() == [150, 40, 0]
    assert ranking.of_example.tolist() == [0, 0, 1, 1, 2]
    summed = document_ranking(scores, docs, tokens, "token_sum")
    np.testing.assert_allclose(summed.scores, [250.0, -10.0, 0.0])
    with pytest.raises(ValueError, match="unknown document score"):
        document_ranking(scores, docs, tokens, "max")  # type: ignore[arg-type]


def test_document_selection_keeps_whole_documents_within_the_budget(demo_rows) -> None:
    """On the demo crawl's documents split into 128-token windows: whole documents only, the
    kept tokens never above the budget, no left-out document would still fit, and the kept
    set is exactly the documented greedy rule's."""
    rng = np.random.default_rng(0)
    doc_ids, tokens = [], []
    for row in demo_rows:
        n = len(row["text"].encode()) // 4 + 1  # roughly a token per 4 bytes
        for start in range(0, n, 128):
            doc_ids.append(row["id"])
            tokens.append(min(128, n - start))
    doc_ids, tokens = np.array(doc_ids), np.array(tokens)
    scores = rng.normal(size=len(doc_ids))
    keys = np.array([f"{d}#{i}" for i, d in enumerate(doc_ids)])
    budget = int(tokens.sum() * 0.2)
    chosen = select(scores, keys, tokens, unit="document", doc_ids=doc_ids, token_budget=budget)
    assert chosen.unit == "document"
    kept_docs = set(doc_ids[chosen.order].tolist())
    assert sorted(chosen.order.tolist()) == np.flatnonzero(np.isin(doc_ids, list(kept_docs))).tolist()
    assert int(tokens[chosen.order].sum()) <= budget
    ranking = document_ranking(scores, doc_ids, tokens)
    left = budget - int(tokens[chosen.order].sum())
    outside = ~np.isin(ranking.doc_ids, list(kept_docs))
    assert (ranking.tokens[outside] > left).all()
    score_of = dict(zip(ranking.doc_ids.tolist(), ranking.scores.tolist(), strict=True))
    tokens_of = dict(zip(ranking.doc_ids.tolist(), ranking.tokens.tolist(), strict=True))
    expected = _brute_force_documents(score_of, tokens_of, budget)
    # examples come document by document in rank order, each document's in pool order
    assert list(dict.fromkeys(doc_ids[chosen.order].tolist())) == expected
    np.testing.assert_allclose(chosen.unit_scores, [score_of[d] for d in doc_ids[chosen.order]])
    # a fraction is a share of the pool's tokens
    same = select(scores, keys, tokens, unit="document", doc_ids=doc_ids, fraction=0.2)
    assert same.order.tolist() == chosen.order.tolist()


def test_document_budgets_that_cannot_work_say_why() -> None:
    ranking = document_ranking(np.zeros(3), np.array(["a", "a", "b"]), np.array([10, 10, 15]))
    with pytest.raises(ValueError, match=r"smaller than the smallest document \(15"):
        select_documents(ranking, 14)
    assert select_documents(ranking, 15).tolist() == [1]
    with pytest.raises(ValueError, match="exceeds the pool's 35"):
        select(np.zeros(3), np.arange(3), np.array([10, 10, 15]), unit="document",
               doc_ids=np.array(["a", "a", "b"]), token_budget=36)
    with pytest.raises(ValueError, match="needs doc_ids"):
        select(np.zeros(3), np.arange(3), np.ones(3), unit="document", fraction=0.5)
    with pytest.raises(ValueError, match="unknown selection unit"):
        select(np.zeros(3), np.arange(3), np.ones(3), unit="page", fraction=0.5)  # type: ignore[arg-type]
