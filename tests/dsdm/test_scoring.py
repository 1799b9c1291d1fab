"""Scoring a pool shard by shard gives what the estimator gives on the whole pool at once,
with each candidate's task means and its most helped and hurt targets."""

import numpy as np
import pytest
import torch

from dsdm import trak
from dsdm.features import Features
from dsdm.scoring import STORED_CONTRIBUTION_SCHEMA, score_pool, soft_thresholded_means


def _features(generator: torch.Generator, rows: int, dim: int = 6) -> Features:
    return Features(phi=torch.randn(rows, dim, generator=generator),
                    q=torch.rand(rows, generator=generator), margin=torch.zeros(rows))


def _pool(seed: int, proxies: int, rows: tuple[int, int], targets: int):
    """Two corpus shards of ``rows`` candidates under each proxy, the targets' features and
    the shards' example ids."""
    gen = torch.Generator().manual_seed(seed)
    shards = {(m, k): _features(gen, n) for m in range(proxies) for k, n in enumerate(rows)}
    target_phi = [torch.randn(targets, 6, generator=gen) for _ in range(proxies)]
    ids = [[f"{prefix}{i}" for i in range(n)] for prefix, n in zip("ab", rows, strict=True)]
    return shards, target_phi, ids


def _score(shards, target_phi, ids, tasks: list[str], **options) -> list:
    return list(score_pool(lambda m, k: shards[m, k], [lambda k=k: ids[k] for k in range(2)],
                           target_phi, [f"t{j}" for j in range(len(tasks))], tasks,
                           lambda_relative=0.1, **options))


def test_shards_score_as_the_whole_pool() -> None:
    shards, target_phi, ids = _pool(0, proxies=2, rows=(5, 4), targets=3)
    parts = _score(shards, target_phi, ids, ["qa", "qa", "cloze"], explain_targets=1)
    # the whole pool at once
    per_proxy = []
    for m in range(2):
        phi = torch.cat([shards[m, 0].phi, shards[m, 1].phi])
        kernel = trak.kernel([phi])
        inverse = trak.regularised_inverse(kernel, trak.default_lambda(kernel, 0.1))
        (block,) = trak.scores([phi], inverse, target_phi[m])
        per_proxy.append(block)
    q = [torch.cat([shards[m, 0].q, shards[m, 1].q]) for m in range(2)]
    whole = trak.ensemble(per_proxy, q)
    tau = torch.cat([p.tau for p in parts])
    assert torch.allclose(tau, whole.float(), atol=1e-5)
    assert [p.example_ids for p in parts] == ids
    means = np.concatenate([p.means["qa"] for p in parts])
    np.testing.assert_allclose(means, whole[:, :2].double().mean(1).numpy(), rtol=1e-5)
    top = parts[1].contributions
    assert top.schema == STORED_CONTRIBUTION_SCHEMA and set(top.column("shard").to_pylist()) == {1}
    # per candidate at most the one target it helps most and the one it hurts most
    assert 0 < top.num_rows <= 4 * 2 and set(top.column("example_id").to_pylist()) <= set(ids[1])


def test_without_the_out_to_loss_weight_shards_score_as_the_mean_over_proxies() -> None:
    shards, target_phi, ids = _pool(2, proxies=3, rows=(4, 3), targets=2)
    parts = _score(shards, target_phi, ids, ["qa", "qa"], out_to_loss_weight=False)
    # Phi_m (Phi_m^T Phi_m + lambda I)^-1 G_m^T, dense, averaged over the proxies; no q
    expected = 0.0
    for m in range(3):
        phi = torch.cat([shards[m, 0].phi, shards[m, 1].phi]).double()
        kernel = phi.T @ phi
        lam = 0.1 * kernel.diagonal().mean()
        expected = expected + phi @ torch.linalg.solve(kernel + lam * torch.eye(6, dtype=torch.float64),
                                                       target_phi[m].double().T) / 3
    tau = torch.cat([p.tau for p in parts])
    torch.testing.assert_close(tau, expected.float(), rtol=1e-4, atol=1e-5)
    q_on = torch.cat([p.tau for p in _score(shards, target_phi, ids, ["qa", "qa"])])
    q_mean = torch.stack([torch.cat([shards[m, 0].q, shards[m, 1].q]) for m in range(3)]).mean(0)
    torch.testing.assert_close(q_on, tau * q_mean[:, None], rtol=1e-4, atol=1e-6)


def test_a_feature_shard_of_other_examples_is_refused() -> None:
    gen = torch.Generator().manual_seed(1)
    shard = _features(gen, 5)
    with pytest.raises(ValueError, match="feature shard 0 has 5 rows, corpus 4"):
        list(score_pool(lambda m, k: shard, [lambda: ["a", "b", "c", "d"]],
                        [torch.randn(2, 6, generator=gen)], ["t0", "t1"], ["x", "x"], 0.1))


def test_soft_thresholded_means_stream_as_the_whole_pool() -> None:
    """Per shard, the task means of tau after each target column is soft-thresholded at s
    times its sd over the whole pool, not over the shard."""
    shards, target_phi, ids = _pool(4, proxies=2, rows=(5, 4), targets=3)
    tasks = ["qa", "qa", "cloze"]
    parts = _score(shards, target_phi, ids, tasks)
    tau = torch.cat([p.tau for p in parts]).double()
    means = list(soft_thresholded_means(lambda: (p.tau for p in parts), tasks, 0.5))
    t = 0.5 * tau.std(0)
    dense = torch.sign(tau) * torch.clamp(tau.abs() - t, min=0)
    assert 0 < int((dense == 0).sum()) < dense.numel()  # the threshold bites, not everywhere
    for task, columns in {"qa": [0, 1], "cloze": [2]}.items():
        streamed = np.concatenate([m[task] for m in means])
        np.testing.assert_allclose(streamed, dense[:, columns].mean(1).numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="> 0"):
        next(soft_thresholded_means(lambda: (p.tau for p in parts), tasks, 0.0))
