"""Baseline selection methods, compared against DsDm under the same budget and output contract.

Every method maps the pool to one score per example (larger = keep first); the shared
selection rule (`dsdm.selection.select_top`) turns scores into the ranked subset under a
budget, so DsDm and every baseline produce the same manifest, shards and DuckDB rows.
Randomised methods put their randomness into the scores (uniform keys, Gumbel noise), which
makes "top-k by score" equal to sampling without replacement.

| method | module | score |
| --- | --- | --- |
| random | `random` | seeded uniform key: top-k is a uniform sample without replacement |
| dsir | `dsir` | log importance weight (target vs pool hashed n-gram model) + Gumbel noise |
| classifier | `classifier` | logit of a linear target-vs-pool classifier on hashed n-grams |
| semdedup | `semdedup` | uniform key for the survivors of near-duplicate removal; -1 for duplicates |
"""

from dsdm.baselines.base import BaselineMethod, PoolData

__all__ = ["BaselineMethod", "PoolData"]
