"""Random selection: the reference every other method is measured against."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict

from dsdm.baselines.base import BaselineMethod, PoolData


class RandomSelection(BaseModel, BaselineMethod):
    """Uniform sampling without replacement, seeded.

    Each example gets an independent uniform key; taking the top k keys is a uniform sample
    of size k, and samples of growing budgets are nested (the 2x random subset contains the 1x
    one), which is what the compute-multiplier curve wants.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False,
                              use_attribute_docstrings=True)
    name: ClassVar[str] = "random"

    seed: int = 0
    """Seeds the keys; the same seed and pool give the same selection."""

    def scores(self, pool: PoolData) -> np.ndarray:
        return uniform_keys(len(pool.texts), self.seed)


def uniform_keys(n: int, seed: int) -> np.ndarray:
    """[n] float64 uniform keys in [0, 1) from a generator of its own (never the global RNG)."""
    return np.random.default_rng(seed).random(n)


def document_keys(doc_ids: ArrayLike, seed: int) -> np.ndarray:
    """[N] float64 keys, one uniform key per document (documents in order of first appearance)
    shared by all its examples: ranking documents by key is a uniform sample of documents,
    whatever their number of examples (a mean of per-example keys would favour short ones)."""
    _, first, inverse = np.unique(np.asarray(doc_ids), return_index=True, return_inverse=True)
    keys = uniform_keys(len(first), seed)
    return keys[np.argsort(np.argsort(first, kind="stable"), kind="stable")][inverse]
