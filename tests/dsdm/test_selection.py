"""The selection rule: task weighting, deterministic ranking, fraction and token budgets."""

from __future__ import annotations

import numpy as np
import pytest

from dsdm.selection import combine_task_scores, dominant_source, rank, select_top


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
        ({"qa": -1.0, "code": 2.0}, "finite and >= 0"),
        ({"qa": float("nan")}, "finite and >= 0"),
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
