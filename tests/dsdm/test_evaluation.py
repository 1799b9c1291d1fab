"""Evaluation engine: losses on real text, multiplier interpolation, Spearman, LDS."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from dsdm.evaluation import (
    HELDOUT_TEXT,
    compute_multiplier,
    example_losses,
    lds_ceiling,
    linear_datamodeling_score,
    spearman,
    target_losses,
    train_evaluation_model,
    unigram_entropy,
    unigram_log_probs,
    unigram_losses,
)
from dsdm.proxy import causal_lm_loss
from dsdm.tokenization import examples_table


def test_multiplier_matches_a_hand_computed_case() -> None:
    budgets, losses = [1, 2, 4], [6.0, 5.6, 5.3]
    # 5.75 lies on the 1x-2x segment at t = 0.25 / 0.4 = 0.625 of log2 budget: 2 ** 0.625
    found = compute_multiplier(budgets, losses, 5.75)
    assert found.value == pytest.approx(2 ** 0.625) and not found.extrapolated
    # 5.45 is half way (in log budget) between 2x and 4x: 2 * sqrt(2)
    assert compute_multiplier(budgets, losses, 5.45).value == pytest.approx(2 * math.sqrt(2))
    # exactly a curve point
    assert compute_multiplier(budgets, losses, 5.6).value == pytest.approx(2.0)
    # better than 4x random: the last segment extended, flagged
    beyond = compute_multiplier(budgets, losses, 5.2)
    assert beyond.extrapolated and beyond.value == pytest.approx(2 * 2 ** (0.4 / 0.3))
    # worse than 1x random: below 1
    worse = compute_multiplier(budgets, losses, 6.2)
    assert worse.extrapolated and worse.value == pytest.approx(2 ** -0.5)
    # budgets given unsorted give the same answer
    assert compute_multiplier([4, 1, 2], [5.3, 6.0, 5.6], 5.75).value == pytest.approx(2 ** 0.625)


def test_multiplier_rejects_bad_curves() -> None:
    with pytest.raises(ValueError, match="at least two"):
        compute_multiplier([1], [6.0], 5.0)
    with pytest.raises(ValueError, match="distinct"):
        compute_multiplier([1, 1], [6.0, 5.0], 5.5)
    with pytest.raises(ValueError, match="flat"):
        compute_multiplier([1, 2], [6.0, 6.0], 5.5)


def test_spearman_against_hand_computed_values() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x: 1,2,3,4,5; y: 2,1,4,3,5 -> 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6*4/120
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    # ties get average ranks: y ranks 1.5, 1.5, 3 -> Pearson of ranks
    assert spearman([1, 2, 3], [5, 5, 7]) == pytest.approx(np.corrcoef([1, 2, 3], [1.5, 1.5, 3])[0, 1])
    assert math.isnan(spearman([1, 2, 3], [1, 1, 1]))


def test_lds_is_high_for_a_linear_truth_and_low_for_noise() -> None:
    rng = np.random.default_rng(0)
    n, t, models = 300, 6, 12
    tau = rng.normal(size=(n, t))
    subsets = [np.sort(rng.choice(n, n // 2, replace=False)) for _ in range(models)]
    truth = np.stack([5.0 - tau[s].sum(0) for s in subsets]) + rng.normal(scale=0.1, size=(models, t))
    tasks = ["a", "a", "a", "b", "b", "b"]
    good = linear_datamodeling_score(tau, subsets, truth, tasks)
    assert good["lds"].min() > 0.95 and good["task_level"].min() > 0.9
    noise = linear_datamodeling_score(tau, subsets, rng.normal(size=(models, t)), tasks)
    assert abs(noise["lds"].mean()) < 0.3
    with pytest.raises(ValueError, match="measured must be"):
        linear_datamodeling_score(tau, subsets, truth[:, :3], tasks)


def test_lds_of_the_thresholded_estimate() -> None:
    """threshold_sd scores sign(tau) * max(|tau| - s * sd_j, 0), sd_j the column's sample sd
    over the pool; where the true effects are sparse and the estimate's noise dense, that
    estimate predicts the subsets' losses better than raw tau."""
    rng = np.random.default_rng(1)
    n, t, models = 400, 6, 16
    truth = np.where(rng.random((n, t)) < 0.05, rng.normal(scale=3.0, size=(n, t)), 0.0)
    estimate = truth + rng.normal(scale=0.5, size=(n, t))
    subsets = [np.sort(rng.choice(n, n // 2, replace=False)) for _ in range(models)]
    losses = np.stack([5.0 - truth[s].sum(0) for s in subsets])
    tasks = ["a", "a", "a", "b", "b", "b"]
    sd = estimate.std(axis=0, ddof=1)
    by_hand = np.sign(estimate) * np.maximum(np.abs(estimate) - 1.0 * sd, 0)
    thresholded = linear_datamodeling_score(estimate, subsets, losses, tasks, threshold_sd=1.0)
    expected = linear_datamodeling_score(by_hand, subsets, losses, tasks)
    assert thresholded["lds"].to_list() == pytest.approx(expected["lds"].to_list(), abs=1e-12)
    raw = linear_datamodeling_score(estimate, subsets, losses, tasks)
    assert (thresholded["lds"] > raw["lds"]).all()
    with pytest.raises(ValueError, match="threshold_sd must be >= 0"):
        linear_datamodeling_score(estimate, subsets, losses, tasks, threshold_sd=-1.0)


def _table(rows: list[tuple[str, str]], length: int, tasks: list[str], split: str) -> pa.Table:
    """Byte-level target table: prompt + continuation, continuation scored."""
    ids, n_tokens, score_from = [], [], []
    for prompt, cont in rows:
        raw = list((prompt + cont).encode())[-length:]
        ids.append(raw + [256] * (length - len(raw)))
        n_tokens.append(len(raw))
        score_from.append(max(1, len(raw) - len(cont.encode())))
    table = examples_table([f"t{i}" for i in range(len(rows))], [f"t{i}" for i in range(len(rows))],
                           tasks, ids, n_tokens, score_from)
    table = table.append_column("task", pa.array(tasks, pa.string()))
    return table.append_column("split", pa.array([split] * len(rows), pa.string()))


def _pool_table(texts: list[str], length: int) -> pa.Table:
    ids = [list(t.encode())[:length] for t in texts]
    return examples_table([f"p{i}" for i in range(len(texts))], [f"p{i}" for i in range(len(texts))],
                          ["demo"] * len(texts), [r + [256] * (length - len(r)) for r in ids],
                          [len(r) for r in ids], [1] * len(ids))


def test_training_on_matching_text_lowers_the_task_loss(docs_by_source, task_rows, tiny_config) -> None:
    """A model trained on Wikipedia text predicts the wiki_qa answers better than one trained
    on recipes: the evaluation measures what the selection put in."""
    config = tiny_config.model_copy(update={"max_steps": 60, "epochs": 4})
    tasks = _table([(r["prompt"], r["continuation"]) for r in task_rows], 64,
                   [r["task"] for r in task_rows], "eval")
    results = {}
    for source in ("wikipedia", "recipes"):
        texts = [d["text"][k : k + 64] for d in docs_by_source[source][:200] for k in (0, 64)]
        model, curve = train_evaluation_model(config, _pool_table(texts, 64))
        assert np.mean(curve[-5:]) < np.mean(curve[:5])
        results[source] = target_losses(model, tasks)
    task = task_rows[0]["task"]
    losses = {s: float(r.filter(r["task"] == task)["loss"][0]) for s, r in results.items()}
    assert losses["wikipedia"] < losses["recipes"]
    assert set(results["wikipedia"]["task"].to_list()) == {task, HELDOUT_TEXT}


def test_losses_are_token_means_over_the_scored_positions(trained_tiny, task_rows) -> None:
    tasks = _table([(r["prompt"], r["continuation"]) for r in task_rows], 64,
                   [r["task"] for r in task_rows], "eval")
    from dsdm.tokenization import to_tensors

    ids, mask = to_tensors(tasks)
    sums, counts = example_losses(trained_tiny.model, ids, mask, batch_size=7)
    with torch.no_grad():
        reference = causal_lm_loss(trained_tiny.model(input_ids=ids).logits, ids, mask).item()
    assert sums.sum() / counts.sum() == pytest.approx(reference, rel=1e-5)
    frame = target_losses(trained_tiny.model, tasks)
    task = task_rows[0]["task"]
    assert frame.filter(frame["task"] == task)["loss"][0] == pytest.approx(reference, rel=1e-5)
    # held-out text scores every real token, so it counts more tokens than the continuations
    tokens = dict(zip(frame["task"].to_list(), frame["tokens"].to_list(), strict=True))
    assert tokens[HELDOUT_TEXT] > tokens[task] == int(mask.sum())
    with pytest.raises(ValueError, match="no target examples"):
        target_losses(trained_tiny.model, tasks, split="select")


def test_unigram_model_against_hand_counts() -> None:
    # vocabulary 4; pool tokens (real ones only): 0 0 1 2 | 0 1  -> counts 3, 2, 1, 0
    pool = examples_table(["a", "b"], ["a", "b"], ["s", "s"], [[0, 0, 1, 2], [0, 1, 3, 3]],
                          [4, 2], [1, 1])
    log_p = unigram_log_probs(pool, 4)
    expected = np.log(np.array([4, 3, 2, 1]) / 10)  # add-one smoothed
    np.testing.assert_allclose(log_p.numpy(), expected)
    assert unigram_entropy(log_p) == pytest.approx(-(np.exp(expected) * expected).sum())
    # one eval row: tokens 2 1 0 3, continuation = the last two (score_from 2)
    targets = examples_table(["t"], ["t"], ["x"], [[2, 1, 0, 3]], [4], [2])
    targets = targets.append_column("task", pa.array(["qa"])).append_column("split", pa.array(["eval"]))
    frame = unigram_losses(log_p, targets)
    losses = dict(zip(frame["task"].to_list(), frame["loss"].to_list(), strict=True))
    assert losses["qa"] == pytest.approx(-(expected[0] + expected[3]) / 2)
    assert losses[HELDOUT_TEXT] == pytest.approx(-(expected[1] + expected[0] + expected[3]) / 3)
    with pytest.raises(ValueError, match="vocab_size is 2"):  # real tokens reach id 2
        unigram_log_probs(pool, 2)


def test_lds_ceiling_by_hand_and_against_simulated_noise() -> None:
    """Two subsets, two models each: expected losses 1 and 3, each model 0.5 off. Noise
    variance 0.5 (each pair's sample variance), the means' variance 2 less 0.5 / 2: signal
    1.75; one seed: sqrt(1.75 / 2.25), two: sqrt(1.75 / 2)."""
    replicates = np.array([[[0.5], [2.5]], [[1.5], [3.5]]])  # [R=2, n=2, T=1]
    assert lds_ceiling(replicates, 1) == pytest.approx([math.sqrt(1.75 / 2.25)])
    assert lds_ceiling(replicates, 2) == pytest.approx([math.sqrt(1.75 / 2.0)])
    # simulated: signal sd 1, noise sd 2; the ceiling is the correlation an exact predictor
    # of the expected loss reaches with the k-model mean
    rng = np.random.default_rng(0)
    expected = rng.normal(size=(4000, 3))
    models = expected + rng.normal(scale=2.0, size=(3, 4000, 3))
    for k in (1, 3):
        reached = [np.corrcoef(expected[:, j], models[:k, :, j].mean(0))[0, 1] for j in range(3)]
        assert lds_ceiling(models, k) == pytest.approx(reached, abs=0.03)
        assert lds_ceiling(models, k) == pytest.approx(math.sqrt(1 / (1 + 4 / k)), abs=0.03)
    with pytest.raises(ValueError, match="R >= 2"):
        lds_ceiling(models[:1], 1)
