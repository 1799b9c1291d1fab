"""Seeded projections: stable seeds, entry statistics, inner-product preservation, and the
Kronecker identity that the factored features rely on."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dsdm.projection import (
    CountSketch,
    DenseProjector,
    derive_seed,
    make_layer_projection,
    random_matrix,
)


def test_derive_seed_is_stable_and_name_dependent() -> None:
    # Python's hash() is salted per process; the derived seed must not be.
    code = "from dsdm.projection import derive_seed; print(derive_seed(7, 'layers.0.mlp'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert int(other.stdout) == derive_seed(7, "layers.0.mlp")
    assert derive_seed(7, "a") != derive_seed(7, "b")
    assert derive_seed(7, "a") != derive_seed(8, "a")
    assert 0 <= derive_seed(7, "a") < 2**63


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_random_matrix_statistics_and_reproducibility(kind: str) -> None:
    a = random_matrix(256, 512, kind=kind, seed=3, scale=0.5)
    assert torch.equal(a, random_matrix(256, 512, kind=kind, seed=3, scale=0.5))
    assert not torch.equal(a, random_matrix(256, 512, kind=kind, seed=4, scale=0.5))
    assert abs(a.mean().item()) < 0.01
    assert a.var().item() == pytest.approx(0.25, rel=0.02)
    if kind == "rademacher":
        assert set(a.unique().tolist()) == {-0.5, 0.5}


def test_random_matrix_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    random_matrix(8, 8, kind="gaussian", seed=1)
    assert torch.equal(state, torch.get_rng_state())


def test_unknown_kind_fails() -> None:
    with pytest.raises(ValueError, match="unknown projection kind"):
        random_matrix(2, 2, kind="sparse", seed=0)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_dense_projector_preserves_inner_products(kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 5000, generator=gen)  # 5000 > one generation chunk
    proj = DenseProjector(5000, 4096, kind=kind, seed=11)
    y = proj.project(x)
    assert torch.equal(y, proj.project(x))
    true, est = x @ x.T, y @ y.T
    # JL: relative error of |x|^2 is ~ sqrt(2/d) = 2.2%; inner products ~ |x||y|/sqrt(d).
    rel = ((est.diagonal() - true.diagonal()) / true.diagonal()).abs()
    assert rel.max() < 0.12
    off = ~torch.eye(20, dtype=torch.bool)
    assert (est[off] - true[off]).abs().max() < 6 * 5000 / 4096**0.5


def test_layer_projection_is_a_kronecker_product() -> None:
    proj = make_layer_projection("blk.0.fc", 12, 7, 5, 3, kind="gaussian", seed=2)
    assert proj.p_out.shape == (5, 12) and proj.p_in.shape == (3, 7) and proj.dim == 15
    g = torch.randn(4, 12, 7)
    kron = torch.kron(proj.p_out, proj.p_in)  # [(5*3), (12*7)], row-major vec
    expected = g.reshape(4, -1) @ kron.T
    torch.testing.assert_close(proj.project_gradient(g), expected, rtol=1e-5, atol=1e-5)


def test_projected_factors_equal_projected_gradient() -> None:
    # sum_t (P_out delta_t)(P_in x_t)^T == P_out (sum_t delta_t x_t^T) P_in^T
    proj = make_layer_projection("l", 10, 6, 4, 3, kind="rademacher", seed=5)
    delta, x = torch.randn(3, 9, 10), torch.randn(3, 9, 6)
    grads = torch.einsum("nto,nti->noi", delta, x)
    via_factors = proj.project_factors(delta @ proj.p_out.T, x @ proj.p_in.T)
    torch.testing.assert_close(via_factors, proj.project_gradient(grads), rtol=1e-5, atol=1e-5)


def test_layer_seeds_differ_by_name() -> None:
    a = make_layer_projection("a", 8, 8, 4, 4, kind="rademacher", seed=0)
    b = make_layer_projection("b", 8, 8, 4, 4, kind="rademacher", seed=0)
    assert not torch.equal(a.p_out, b.p_out)
    assert not torch.equal(a.p_in, a.p_out)


def test_full_side_is_the_identity_when_asked() -> None:
    proj = make_layer_projection("l", 10, 6, 4, 6, kind="rademacher", seed=5, exact_full_sides=True)
    assert torch.equal(proj.p_in, torch.eye(6)) and proj.p_out.shape == (4, 10)
    plain = make_layer_projection("l", 10, 6, 4, 6, kind="rademacher", seed=5)
    assert not torch.equal(plain.p_in, torch.eye(6))
    assert torch.equal(plain.p_out, proj.p_out)  # the projected side is the same matrix


def test_countsketch_is_seeded_and_preserves_inner_products() -> None:
    sketch = CountSketch.make(20_000, 2048, seed=3)
    assert torch.equal(sketch.buckets, CountSketch.make(20_000, 2048, seed=3).buckets)
    assert not torch.equal(sketch.buckets, CountSketch.make(20_000, 2048, seed=4).buckets)
    assert set(sketch.signs.unique().tolist()) == {-1.0, 1.0}
    assert int(sketch.buckets.min()) >= 0 and int(sketch.buckets.max()) < 2048
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 20_000, generator=gen, dtype=torch.float64)
    y = sketch.apply(x).double()
    # every coordinate lands in exactly one bucket with its sign: an explicit sparse matrix
    dense = torch.zeros(20_000, 2048, dtype=torch.float64)
    dense[torch.arange(20_000), sketch.buckets] = sketch.signs.double()
    torch.testing.assert_close(y, x @ dense, rtol=1e-5, atol=1e-4)
    true, est = x @ x.T, y @ y.T
    rel = ((est.diagonal() - true.diagonal()) / true.diagonal()).abs()
    assert rel.max() < 0.15  # sd of |x|^2's relative error: sqrt(2 / 2048) = 3.1%
    off = ~torch.eye(16, dtype=torch.bool)
    assert (est[off] - true[off]).abs().max() < 6 * 20_000 / 2048**0.5
    with pytest.raises(ValueError, match="expected"):
        sketch.apply(torch.zeros(2, 7))
