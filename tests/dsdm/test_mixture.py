"""The datamodel over domains: capped allocation, the linear fit, the choice, source quotas."""

from __future__ import annotations

import numpy as np
import pytest

from dsdm.mixture import (
    LinearMixtureModel,
    allocate,
    choose_mixture,
    fit_linear_mixture,
    mixture_plan,
    mixture_quotas,
    mixture_subset,
    quota_keys,
    quota_scores,
)


def test_allocate_is_proportional_when_nothing_is_capped() -> None:
    np.testing.assert_array_equal(allocate(np.array([0.5, 0.3, 0.2]), 10, np.array([9, 9, 9])),
                                  [5, 3, 2])


def test_allocate_redistributes_a_capped_source_by_the_others_shares() -> None:
    # source 0 wants 48 but holds 10; the other 50 split 1:1, as their shares are equal
    counts = allocate(np.array([0.8, 0.1, 0.1]), 60, np.array([10, 100, 50]))
    np.testing.assert_array_equal(counts, [10, 25, 25])
    # a second cap in turn: source 2 holds only 5
    np.testing.assert_array_equal(allocate(np.array([0.8, 0.1, 0.1]), 60, np.array([10, 100, 5])),
                                  [10, 45, 5])


def test_allocate_sums_to_the_budget_within_caps() -> None:
    available = np.array([992, 1050, 1098, 1601, 2253])
    for shares in mixture_plan(available / available.sum(), 200, 2.0, seed=0):
        counts = allocate(shares, 3000, available)
        assert counts.sum() == 3000 and (counts <= available).all() and (counts >= 0).all()


def test_allocate_refuses_a_budget_larger_than_the_pool() -> None:
    with pytest.raises(ValueError, match="exceeds the pool"):
        allocate(np.array([0.5, 0.5]), 30, np.array([10, 10]))


def test_linear_fit_recovers_the_predictions_of_noiseless_data() -> None:
    rng = np.random.default_rng(0)
    shares = mixture_plan(np.array([0.2, 0.3, 0.5]), 12, 5.0, seed=1)
    truth = np.array([[1.0, -2.0], [0.0, 0.5], [-1.0, 1.0]])  # [S, T]
    losses = 5.0 + shares @ truth
    model = fit_linear_mixture(shares, losses, ridge=1e-9)
    fresh = rng.dirichlet(np.ones(3), size=5)
    # shares sum to one, so only predictions on the simplex are identified, not coef
    np.testing.assert_allclose(model.predict(fresh), 5.0 + fresh @ truth, atol=1e-6)
    np.testing.assert_allclose(model.r2, 1.0, atol=1e-9)
    np.testing.assert_allclose(model.r2_loo, 1.0, atol=1e-6)
    np.testing.assert_allclose(model.scale, losses.std(0))


def test_leave_one_out_r2_exposes_noise() -> None:
    rng = np.random.default_rng(0)
    shares = mixture_plan(np.array([0.2, 0.3, 0.5]), 12, 5.0, seed=1)
    model = fit_linear_mixture(shares, rng.normal(size=(12, 2)))
    assert (model.r2_loo < model.r2).all() and (model.r2_loo < 0.3).all()


def test_choose_mixture_moves_towards_the_helpful_source_within_its_cap() -> None:
    pool = np.array([0.1, 0.45, 0.45])
    available = np.array([100, 450, 450])
    shares = mixture_plan(pool, 40, 10.0, seed=2)
    # every task's loss falls with source 0's share
    losses = np.stack([2.0 - shares[:, 0], 3.0 - 2 * shares[:, 0]], 1)
    model = fit_linear_mixture(shares, losses)
    chosen = choose_mixture(model, pool, available, 400, concentration=10.0, top=20, seed=0)
    assert chosen.sum() == pytest.approx(1.0)
    assert chosen[0] > 0.2  # above the pool's 0.1
    assert chosen[0] * 400 <= 100 + 1e-9  # never more than source 0 holds


def test_quota_keys_take_each_quota_best_first() -> None:
    sources = np.array(["a", "b", "a", "b", "a", "b"])
    scores = np.array([0.1, 0.9, 0.7, 0.2, 0.5, 0.3])
    keys = quota_keys(sources, scores, {"a": 2, "b": 1})
    top = set(np.argsort(-keys, kind="stable")[:3].tolist())
    assert top == {2, 4, 1}  # a's best two, b's best one
    assert np.isneginf(quota_keys(sources, scores, {"a": 1, "b": 0})[[1, 3, 5]]).all()
    with pytest.raises(ValueError, match="exceeds its 3 examples"):
        quota_keys(sources, scores, {"a": 4})


def test_quota_scores_keep_the_scores_within_quota_and_put_the_rest_below() -> None:
    sources = np.array(["a", "b", "a", "b", "a", "b", "c"])
    scores = np.array([0.1, 0.9, 0.7, 0.2, 0.5, 0.3, 2.0])
    quotas = {"a": 2, "b": 1, "c": 0}
    out = quota_scores(sources, scores, quotas)
    inside = [1, 2, 4]  # b's best, a's best two
    np.testing.assert_array_equal(out[inside], scores[inside])
    assert out[[0, 3, 5, 6]].max() < out[inside].min() and np.isfinite(out).all()
    # the same order as the quota keys
    keys = quota_keys(sources, scores, quotas)
    np.testing.assert_array_equal(np.argsort(-out, kind="stable")[3:],
                                  np.argsort(-keys, kind="stable")[3:])


POOL, AVAILABLE = np.array([0.2, 0.4, 0.4]), np.array([200, 400, 400])


def two_conflicting_tasks() -> LinearMixtureModel:
    """Source 0 helps task 0 a lot and hurts task 1 a little; source 1 helps task 1."""
    shares = mixture_plan(POOL, 40, 10.0, seed=3)
    losses = np.stack([2.0 - 3 * shares[:, 0], 3.0 + shares[:, 0] - shares[:, 1]], 1)
    return fit_linear_mixture(shares, losses)


def test_worst_objective_trades_no_task_for_the_others() -> None:
    pool, available, model = POOL, AVAILABLE, two_conflicting_tasks()

    def worst_change(chosen: np.ndarray) -> float:
        return float(((model.predict(chosen) - model.predict(pool)) / model.scale).max())

    kwargs = {"concentration": 10.0, "top": 1, "candidates": 2000, "seed": 0}
    by_mean = choose_mixture(model, pool, available, 500, objective="mean", **kwargs)
    by_worst = choose_mixture(model, pool, available, 500, objective="worst", **kwargs)
    # the same candidates, so the worst-case choice is at least as good on its own measure
    assert worst_change(by_worst) <= worst_change(by_mean)
    assert worst_change(by_worst) < 0  # every task predicted better than the pool's mixture
    with pytest.raises(ValueError, match="unknown mixture objective"):
        choose_mixture(model, pool, available, 500, objective="best", **kwargs)  # type: ignore[arg-type]


def test_per_task_objective_averages_each_tasks_own_choice() -> None:
    pool, available, model = POOL, AVAILABLE, two_conflicting_tasks()
    kwargs = {"concentration": 10.0, "top": 5, "candidates": 2000, "seed": 0}
    own = [choose_mixture(model, pool, available, 500, weights=w, **kwargs)
           for w in ([1.0, 0.0], [0.0, 1.0])]
    np.testing.assert_allclose(
        choose_mixture(model, pool, available, 500, objective="per_task", **kwargs),
        np.mean(own, axis=0))
    assert own[0][0] > pool[0] and own[1][1] > pool[1]  # each task's mix leans its own way


def test_a_fit_to_noise_keeps_the_pools_mixture() -> None:
    rng = np.random.default_rng(4)
    shares = mixture_plan(POOL, 12, 10.0, seed=5)
    noise = fit_linear_mixture(shares, rng.normal(size=(12, 2)))
    assert (noise.r2_loo <= 0).all()
    for objective in ("mean", "worst", "per_task"):
        np.testing.assert_allclose(choose_mixture(noise, POOL, AVAILABLE, 500, concentration=10.0,
                                                  objective=objective), POOL)


def test_only_predicted_tasks_steer_the_choice() -> None:
    shares = mixture_plan(POOL, 40, 10.0, seed=3)
    signal = 2.0 - 3 * shares[:, 0]  # source 0 helps this task
    rng = np.random.default_rng(6)
    model = fit_linear_mixture(shares, np.stack([signal, rng.normal(size=40)], 1))
    assert model.r2_loo[0] > 0.9 and model.r2_loo[1] <= 0
    kwargs = {"concentration": 10.0, "top": 5, "candidates": 2000, "seed": 0}
    alone = choose_mixture(model, POOL, AVAILABLE, 500, weights=[1.0, 0.0], **kwargs)
    # the noise task has no say in the mean or the worst case ...
    np.testing.assert_allclose(choose_mixture(model, POOL, AVAILABLE, 500, **kwargs), alone)
    np.testing.assert_allclose(
        choose_mixture(model, POOL, AVAILABLE, 500, objective="worst", **kwargs), alone)
    # ... and its equal share of per_task keeps the pool's mixture
    np.testing.assert_allclose(
        choose_mixture(model, POOL, AVAILABLE, 500, objective="per_task", **kwargs),
        (alone + POOL) / 2)


def test_mixture_quotas_fill_the_budget_towards_the_helpful_source() -> None:
    shares = mixture_plan(POOL, 30, 10.0, seed=7)
    quotas, model = mixture_quotas(shares, np.stack([2.0 - shares[:, 0]], 1), AVAILABLE, 500,
                                   concentration=10.0, top=20)
    assert quotas.sum() == 500 and (quotas <= AVAILABLE).all()
    assert quotas[0] > POOL[0] * 500 and model.r2_loo[0] > 0.9


def test_mixture_subset_draws_each_sources_count_without_replacement() -> None:
    sources = np.array(["a"] * 5 + ["b"] * 7 + ["c"] * 3)
    subset = mixture_subset(sources, {"a": 2, "b": 7, "c": 0}, seed=1)
    assert (np.diff(subset) > 0).all()  # sorted, no repeats
    assert {s: int((sources[subset] == s).sum()) for s in "abc"} == {"a": 2, "b": 7, "c": 0}
    np.testing.assert_array_equal(subset, mixture_subset(sources, {"a": 2, "b": 7, "c": 0}, 1))


def test_a_task_to_avoid_weighs_against_the_mix_that_helps_it() -> None:
    model = two_conflicting_tasks()
    kwargs = {"concentration": 10.0, "top": 5, "candidates": 2000, "seed": 0}
    # task 0 a little, task 1 to avoid three times as much: the weights sum to a negative
    chosen = choose_mixture(model, POOL, AVAILABLE, 500, weights=[0.25, -0.75], **kwargs)
    change = (model.predict(chosen) - model.predict(POOL)) / model.scale
    assert change[1] > 0  # the avoided task's loss is pushed up, not down
