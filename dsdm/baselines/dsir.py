"""DSIR (Xie et al., 2023): importance resampling with hashed n-gram models.

Two bag-of-n-grams models over ``num_buckets`` hashed unigram+bigram buckets: p_target from
the target texts, p_pool from the pool. An example x with bucket counts c(x) gets the log
importance weight

    log w(x) = sum_b c_b(x) * (log p_target[b] - log p_pool[b])

and selection samples k examples without replacement with probability proportional to w:
the Gumbel top-k trick, score = log w + Gumbel noise, then keep the k largest. Everything
stays in log space (w itself overflows for long examples). ``smoothing`` is added to both
probability vectors so a bucket never seen in the target text gives a large, finite penalty.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from dsdm.baselines.base import BaselineMethod, PoolData
from dsdm.baselines.ngrams import HashedNgrams, hashed_ngrams


class DsirSelection(BaseModel, BaselineMethod):
    """DSIR with hashed n-gram features and Gumbel top-k resampling."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False,
                              use_attribute_docstrings=True)
    name: ClassVar[str] = "dsir"

    num_buckets: int = Field(10_000, ge=2)
    """Hash buckets of the n-gram models (the paper uses 10k)."""
    ngrams: int = Field(2, ge=1, le=2)
    """1: unigrams; 2: unigrams and bigrams."""
    smoothing: float = Field(1e-8, gt=0)
    """Added to both bucket probabilities before the log."""
    gumbel: bool = True
    """Add Gumbel noise (importance resampling); False keeps the top-k log weights."""
    seed: int = 0
    """Seeds the Gumbel noise."""

    def scores(self, pool: PoolData) -> np.ndarray:
        log_w = self.log_importance_weights(pool)
        if not self.gumbel:
            return log_w
        return log_w + np.random.default_rng(self.seed).gumbel(size=log_w.shape)

    def log_importance_weights(self, pool: PoolData) -> np.ndarray:
        """[N] float64 log w of every pool example."""
        if not len(pool.target_texts):
            raise ValueError("DSIR needs target texts (the select split of the target tasks)")
        features = hashed_ngrams(pool.texts, self.num_buckets, self.ngrams)
        target = hashed_ngrams(pool.target_texts, self.num_buckets, self.ngrams)
        return features.per_text_sum(self.log_ratio(target, features))

    def log_ratio(self, target: HashedNgrams, pool: HashedNgrams) -> np.ndarray:
        """[B] log p_target - log p_pool per bucket."""
        p_target = _probabilities(target.bucket_counts(), "target texts")
        p_pool = _probabilities(pool.bucket_counts(), "pool")
        return np.log(p_target + self.smoothing) - np.log(p_pool + self.smoothing)


def _probabilities(counts: np.ndarray, what: str) -> np.ndarray:
    total = counts.sum()
    if total <= 0:
        raise ValueError(f"the {what} contain no words to build an n-gram model from")
    return counts / total
