"""Seeded random projections (the P of TRAK's phi = P^T grad f).

Three shapes of projection are offered:

- `DenseProjector` maps a flat vector of dimension D to d dimensions with one [D, d] matrix.
  It is the reference: simple, but it needs the full gradient.
- `LayerProjection` is the factored (Kronecker) pair for one linear layer with a weight of
  shape [out_features, in_features]: P_out [k_out, out_features] and P_in [k_in, in_features].
  A weight gradient G is mapped to P_out G P_in^T, which is (P_out kron P_in) applied to
  vec(G). For G = sum_t delta_t x_t^T this equals sum_t (P_out delta_t)(P_in x_t)^T, so the
  projection never needs G itself (see `dsdm.features`). A side whose k equals the layer's
  size may be the identity (`exact_full_sides`): that side then adds no error at all.
- `CountSketch` hashes a long vector (the concatenated Kronecker outputs of all layers) down
  to d: coordinate i is added, with a random sign, to one random bucket. It costs O(D) per
  vector and has a dense Gaussian projection's variance, which is why it follows a *wide*
  Kronecker stage: per-example weight gradients are close to low rank, and a Kronecker
  sketch of a rank-r gradient with k_out = k_in = k behaves like a JL map of about k * r
  dimensions, not k^2, so small per-layer factors (16 x 16) lose most of the signal.

Normalisation: entries have mean 0 and variance 1/rows, so E[<P a, P b>] = <a, b>; for the
Kronecker pair the product has variance 1/(k_out k_in), with the same property. This scale is
the only "normaliser" applied to phi; the TRAK scores are invariant to a common scale of phi
when lambda is relative to the kernel's diagonal (`dsdm.trak.default_lambda`).

Randomness is explicit: every matrix comes from its own `torch.Generator`, seeded from a base
seed and a name through a stable hash (`derive_seed`), and is generated on the CPU so the
same seed gives the same matrix on every device.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import torch

ProjectionKind = Literal["rademacher", "gaussian"]
"""Distribution of the entries: random signs, or standard normal (both then scaled)."""

_DENSE_CHUNK = 4096
"""Input rows of a dense projection generated at once. Part of the definition of the matrix
(each chunk has its own derived seed), so it must never change."""


def derive_seed(base_seed: int, name: str) -> int:
    """A 63-bit seed from (base seed, name), stable across processes and Python versions.

    Python's `hash` is salted per process, so it cannot be used; blake2b is.
    """
    digest = hashlib.blake2b(f"{int(base_seed)}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def random_matrix(
    rows: int,
    cols: int,
    *,
    kind: ProjectionKind,
    seed: int,
    scale: float = 1.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A [rows, cols] matrix with i.i.d. entries of variance `scale**2`.

    Generated in float32 on the CPU with a private generator (device-independent), then moved.
    """
    if rows <= 0 or cols <= 0:
        raise ValueError(f"projection shape must be positive, got ({rows}, {cols})")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "rademacher":
        bits = torch.randint(0, 2, (rows, cols), generator=gen, dtype=torch.int8)
        mat = bits.to(torch.float32).mul_(2.0).sub_(1.0)
    elif kind == "gaussian":
        mat = torch.randn((rows, cols), generator=gen, dtype=torch.float32)
    else:
        raise ValueError(f"unknown projection kind {kind!r}; expected 'rademacher' or 'gaussian'")
    return mat.mul_(scale).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class DenseProjector:
    """Projects flat vectors [N, dim_in] -> [N, dim_out] with a seeded dense matrix P.

    P is [dim_in, dim_out] with entry variance 1/dim_out, generated in chunks of input rows
    so memory stays at O(chunk x dim_out) however large dim_in is.
    """

    dim_in: int
    """D, the dimension of the vectors to project (e.g. the number of featurised weights)."""
    dim_out: int
    """d, the projected dimension."""
    kind: ProjectionKind = "rademacher"
    """Entry distribution."""
    seed: int = 0
    """Base seed; chunk c uses derive_seed(seed, f"dense/{c}")."""

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, dim_in] -> [N, dim_out] float32 (accumulated in float32)."""
        if x.ndim != 2 or x.shape[1] != self.dim_in:
            raise ValueError(f"expected [N, {self.dim_in}], got {tuple(x.shape)}")
        x = x.to(torch.float32)
        out = torch.zeros(x.shape[0], self.dim_out, dtype=torch.float32, device=x.device)
        scale = 1.0 / math.sqrt(self.dim_out)
        for c, start in enumerate(range(0, self.dim_in, _DENSE_CHUNK)):
            stop = min(start + _DENSE_CHUNK, self.dim_in)
            p = random_matrix(
                stop - start,
                self.dim_out,
                kind=self.kind,
                seed=derive_seed(self.seed, f"dense/{c}"),
                scale=scale,
                device=x.device,
            )
            out.addmm_(x[:, start:stop], p)
        return out


@dataclass(frozen=True)
class LayerProjection:
    """The factored projection of one linear layer's weight gradient.

    `p_out` is [k_out, out_features], `p_in` is [k_in, in_features]; the projected gradient
    of a weight gradient G [out_features, in_features] is vec(P_out G P_in^T), of length
    k_out * k_in, flattened row-major (index = i_out * k_in + i_in).
    """

    name: str
    """Module name of the layer (as in `model.named_modules()`)."""
    p_out: torch.Tensor
    """P_out, [k_out, out_features], float32."""
    p_in: torch.Tensor
    """P_in, [k_in, in_features], float32."""

    @property
    def dim(self) -> int:
        """k_out * k_in, this layer's share of d."""
        return self.p_out.shape[0] * self.p_in.shape[0]

    def project_gradient(self, grads: torch.Tensor) -> torch.Tensor:
        """Full per-example gradients G [N, out, in] -> [N, k_out * k_in] (float32)."""
        g = grads.to(torch.float32)
        proj = torch.einsum("ko,noi,ji->nkj", self.p_out, g, self.p_in)
        return proj.reshape(g.shape[0], -1)

    def project_factors(
        self, delta_proj: torch.Tensor, x_proj: torch.Tensor
    ) -> torch.Tensor:
        """Already-projected factors -> per-example projected gradient.

        delta_proj: [N, T, k_out] (P_out delta_t), x_proj: [N, T, k_in] (P_in x_t).
        Returns sum_t (P_out delta_t)(P_in x_t)^T flattened, [N, k_out * k_in].
        """
        out = torch.einsum("ntk,ntj->nkj", delta_proj, x_proj)
        return out.reshape(out.shape[0], -1)


def make_layer_projection(
    name: str,
    out_features: int,
    in_features: int,
    k_out: int,
    k_in: int,
    *,
    kind: ProjectionKind,
    seed: int,
    exact_full_sides: bool = False,
    device: torch.device | str = "cpu",
) -> LayerProjection:
    """The (P_out, P_in) pair for layer `name`, seeded from (seed, name).

    Entry variances are 1/k_out and 1/k_in so the Kronecker product preserves inner
    products in expectation. With `exact_full_sides`, a side with k equal to its size is the
    identity instead of a random square matrix.
    """

    def side(k: int, features: int, which: str) -> torch.Tensor:
        if exact_full_sides and k == features:
            return torch.eye(k, dtype=torch.float32, device=device)
        return random_matrix(k, features, kind=kind, seed=derive_seed(seed, f"{name}/{which}"),
                             scale=1.0 / math.sqrt(k), device=device)

    return LayerProjection(name=name, p_out=side(k_out, out_features, "out"),
                           p_in=side(k_in, in_features, "in"))


@dataclass(frozen=True)
class CountSketch:
    """A seeded sparse JL map [N, dim_in] -> [N, dim_out]: y_b = sum_{i: h(i) = b} s(i) x_i.

    E[<S a, S b>] = <a, b> and Var = (|a|^2 |b|^2 + <a, b>^2 - 2 sum_i a_i^2 b_i^2) / dim_out:
    a dense Gaussian projection's variance less the last term. The buckets h and signs s
    are drawn on the CPU from derive_seed(seed, "countsketch"), so every device gets the
    same map.
    """

    dim_in: int
    """D, the length of the vectors to sketch."""
    dim_out: int
    """d, the number of buckets."""
    buckets: torch.Tensor
    """[dim_in] int64 bucket of each input coordinate."""
    signs: torch.Tensor
    """[dim_in] float32, +1 or -1."""

    @classmethod
    def make(cls, dim_in: int, dim_out: int, *, seed: int,
             device: torch.device | str = "cpu") -> CountSketch:
        if dim_in <= 0 or dim_out <= 0:
            raise ValueError(f"sketch shape must be positive, got ({dim_in}, {dim_out})")
        gen = torch.Generator(device="cpu").manual_seed(derive_seed(seed, "countsketch"))
        buckets = torch.randint(0, dim_out, (dim_in,), generator=gen)
        signs = torch.randint(0, 2, (dim_in,), generator=gen).to(torch.float32).mul_(2).sub_(1)
        return cls(dim_in, dim_out, buckets.to(device), signs.to(device))

    def to(self, device: torch.device | str) -> CountSketch:
        return CountSketch(self.dim_in, self.dim_out, self.buckets.to(device),
                           self.signs.to(device))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, dim_in] -> [N, dim_out] float32."""
        if x.ndim != 2 or x.shape[1] != self.dim_in:
            raise ValueError(f"expected [N, {self.dim_in}], got {tuple(x.shape)}")
        out = torch.zeros(x.shape[0], self.dim_out, dtype=torch.float32, device=x.device)
        return out.index_add_(1, self.buckets, x.float() * self.signs)
