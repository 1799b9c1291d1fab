import numpy as np
import pytest
import torch

from dsdm.explain import mixing_coefficients, top_contributions
from dsdm.selection import combine_task_scores


def _brute_force(tau: np.ndarray, k: int) -> set[tuple]:
    rows = set()
    for i in range(tau.shape[0]):
        for effect, sign in (("helps", 1), ("hurts", -1)):
            # stable: among equal values the earlier target first
            order = sorted(range(tau.shape[1]), key=lambda j: (-sign * tau[i, j], j))[:k]
            for r, j in enumerate(order, start=1):
                if sign * tau[i, j] > 0:
                    rows.add((f"e{i}", effect, r, f"t{j}", f"task{j % 3}", float(tau[i, j])))
    return rows


@pytest.mark.parametrize("k", [1, 3, 50])
def test_top_contributions_match_a_brute_force_ranking(k):
    generator = np.random.default_rng(0)
    tau = generator.normal(size=(7, 11)).astype(np.float32)
    tau[2, :] = 0.5  # all ties, all positive: helps takes the first k targets, hurts none
    tau[3, 4] = tau[3, 9] = tau[3].max() + 1  # a tie at the top
    table = top_contributions(torch.from_numpy(tau), [f"e{i}" for i in range(7)],
                              [f"t{j}" for j in range(11)], [f"task{j % 3}" for j in range(11)], k)
    got = {tuple(r.values()) for r in table.to_pylist()}
    assert got == _brute_force(tau, min(k, 11))
    assert not [r for r in got if r[0] == "e2" and r[1] == "hurts"]


def test_top_contributions_reject_mismatched_labels():
    with pytest.raises(ValueError, match="3 target ids"):
        top_contributions(torch.zeros(2, 4), ["a", "b"], ["x", "y", "z"], ["t"] * 4, 2)
    with pytest.raises(ValueError, match="at least 1"):
        top_contributions(torch.zeros(2, 4), ["a", "b"], list("wxyz"), ["t"] * 4, 0)


@pytest.mark.parametrize("standardise", [False, True])
@pytest.mark.parametrize("weights", [None, {"a": 2.0, "b": -1.0}, {"c": 1.0}])
def test_mixed_score_is_the_sum_of_the_task_parts(standardise, weights):
    generator = np.random.default_rng(1)
    scores = {"a": generator.normal(size=50), "b": 10 * generator.normal(size=50),
              "c": np.full(50, 3.0)}  # c has no spread
    coefficients = mixing_coefficients(scores, weights, standardise=standardise)
    assert set(coefficients) == {"a", "b", "c"}
    parts = sum(coefficients[t] * scores[t] for t in scores)
    combined = combine_task_scores(scores, weights, standardise=standardise)
    np.testing.assert_allclose(parts, combined, rtol=1e-12, atol=1e-12)
    if weights and "c" not in weights:
        assert coefficients["c"] == 0.0
    if weights == {"a": 2.0, "b": -1.0}:
        assert coefficients["a"] > 0 > coefficients["b"]  # the avoided task counts against


def test_mixing_coefficients_reject_the_weights_combine_rejects():
    with pytest.raises(ValueError, match="unknown tasks"):
        mixing_coefficients({"a": np.zeros(3)}, {"b": 1.0})
    with pytest.raises(ValueError, match="all zero"):
        mixing_coefficients({"a": np.zeros(3)}, {"a": 0.0})
