"""Quality-classifier selection (as GPT-3's filter): a linear model of "looks like the target".

Positives are the target texts (select split), negatives a seeded random sample of the pool;
features are hashed unigram+bigram frequencies (each text's n-gram counts divided by its
n-gram total, so length does not decide). A logistic regression is fit full-batch with
class-balanced weights and an L2 penalty; every pool example is scored by the logit of the
target class and the top-k are kept (no sampling noise: the classifier's ranking is the
selection).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from dsdm.baselines.base import BaselineMethod, PoolData
from dsdm.baselines.ngrams import HashedNgrams, hashed_ngrams


class ClassifierSelection(BaseModel, BaselineMethod):
    """Linear target-vs-pool classifier on hashed n-grams; keep the most target-like."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False,
                              use_attribute_docstrings=True)
    name: ClassVar[str] = "classifier"

    num_buckets: int = Field(10_000, ge=2)
    """Hash buckets of the n-gram features."""
    ngrams: int = Field(2, ge=1, le=2)
    """1: unigrams; 2: unigrams and bigrams."""
    negatives_per_positive: float = Field(4.0, gt=0)
    """Pool examples drawn as negatives, per target text (capped at the pool size)."""
    steps: int = Field(300, ge=1)
    """Full-batch Adam steps."""
    lr: float = Field(0.05, gt=0)
    """Adam learning rate."""
    l2: float = Field(1e-4, ge=0)
    """L2 penalty on the weights (not the bias)."""
    seed: int = 0
    """Seeds the choice of negatives."""

    def scores(self, pool: PoolData) -> np.ndarray:
        if not len(pool.target_texts):
            raise ValueError("the classifier needs target texts (select split of the tasks)")
        features = hashed_ngrams(pool.texts, self.num_buckets, self.ngrams)
        target = hashed_ngrams(pool.target_texts, self.num_buckets, self.ngrams)
        n_neg = min(features.num_texts, max(1, round(self.negatives_per_positive * target.num_texts)))
        negatives = np.sort(np.random.default_rng(self.seed).permutation(features.num_texts)[:n_neg])
        weight, bias = self.fit(target, _subset(features, negatives))
        return _logits(features, weight, bias)

    def fit(self, positives: HashedNgrams, negatives: HashedNgrams) -> tuple[torch.Tensor, float]:
        """Weights [B] and bias of the logistic regression (label 1 = target).

        The gradient is computed in closed form over the sparse occurrences (numpy
        bincounts: O(n-gram occurrences) per step) and handed to Adam.
        """
        both = _concat(positives, negatives)
        labels = np.concatenate([np.ones(positives.num_texts), np.zeros(negatives.num_texts)])
        balance = np.where(labels > 0, 0.5 / positives.num_texts, 0.5 / negatives.num_texts)
        frequency = 1.0 / np.maximum(both.lengths(), 1)[both.text]  # [M] per occurrence
        weight = torch.zeros(self.num_buckets, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        optim = torch.optim.Adam([weight, bias], lr=self.lr)
        for _ in range(self.steps):
            w = weight.detach().numpy()
            logits = np.bincount(both.text, weights=w[both.bucket] * frequency,
                                 minlength=both.num_texts) + float(bias.detach())
            residual = balance * (1.0 / (1.0 + np.exp(-logits)) - labels)  # dloss/dlogit
            grad_w = np.bincount(both.bucket, weights=residual[both.text] * frequency,
                                 minlength=self.num_buckets) + 2 * self.l2 * w
            weight.grad = torch.from_numpy(grad_w)
            bias.grad = torch.tensor([residual.sum()])
            optim.step()
        return weight.detach(), float(bias.detach())


def _logits(ngrams: HashedNgrams, weight: torch.Tensor, bias: float) -> np.ndarray:
    """[N] float64 bias + mean of the weights of each text's n-grams (bias alone if none)."""
    lengths = np.maximum(ngrams.lengths(), 1)
    return ngrams.per_text_sum(weight.double().numpy()) / lengths + bias


def _subset(ngrams: HashedNgrams, rows: np.ndarray) -> HashedNgrams:
    """The n-grams of texts ``rows`` (sorted), renumbered 0..len(rows)-1."""
    position = np.full(ngrams.num_texts, -1, dtype=np.int64)
    position[rows] = np.arange(len(rows))
    keep = position[ngrams.text] >= 0
    return HashedNgrams(position[ngrams.text[keep]], ngrams.bucket[keep], len(rows),
                        ngrams.num_buckets)


def _concat(first: HashedNgrams, second: HashedNgrams) -> HashedNgrams:
    return HashedNgrams(np.concatenate([first.text, second.text + first.num_texts]),
                        np.concatenate([first.bucket, second.bucket]),
                        first.num_texts + second.num_texts, first.num_buckets)
