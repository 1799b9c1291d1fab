"""Scoring a pool from its feature shards: tau per shard, each candidate's mean per task, and
the targets it helps and hurts most (what `dsdm explain` shows).

The datamodel step streams this: one corpus shard's tau [n_k, T] at a time (see
`dsdm.datamodels.ensemble_scores`), so the pool never has to fit in memory.
"""

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from dsdm import trak
from dsdm.datamodels import ensemble_scores, task_means
from dsdm.explain import CONTRIBUTION_SCHEMA, top_contributions
from dsdm.features import Features

#: a contributions table as stored: `CONTRIBUTION_SCHEMA` plus the candidate's corpus shard
STORED_CONTRIBUTION_SCHEMA = CONTRIBUTION_SCHEMA.append(pa.field("shard", pa.int32()))


@dataclass(frozen=True)
class ShardScores:
    """One corpus shard's share of the datamodel."""

    shard: int
    example_ids: list[str]
    tau: torch.Tensor
    """[n_k, T] float32: predicted loss reduction of each target by each candidate."""
    means: dict[str, np.ndarray]
    """task -> [n_k] float64: mean of tau over the task's targets (the candidate's score)."""
    contributions: pa.Table | None
    """`STORED_CONTRIBUTION_SCHEMA` rows: per candidate the ``explain_targets`` targets it
    helps most and hurts most; None when none are kept."""


def score_pool(
    load_shard: Callable[[int, int], Features], shard_ids: Sequence[Callable[[], list[str]]],
    target_phi: Sequence[torch.Tensor], target_ids: Sequence[str], target_tasks: Sequence[str],
    lambda_relative: float, explain_targets: int = 0, out_to_loss_weight: bool = True,
) -> Iterator[ShardScores]:
    """The ensemble's tau for each corpus shard k, with its task means and top contributions.

    ``load_shard(m, k)``: proxy m's features of corpus shard k; ``shard_ids[k]()``: that
    shard's example ids in corpus order; ``target_phi[m]``: G_m [T, d] of the targets
    ``target_ids`` (tasks ``target_tasks``). A ValueError when a feature shard's rows are not
    its corpus shard's examples. ``out_to_loss_weight``: whether tau carries the candidates'
    mean out-to-loss weight q (`dsdm.trak.ensemble`)."""
    for k, tau in enumerate(ensemble_scores(load_shard, len(shard_ids), target_phi,
                                            lambda_relative, out_to_loss_weight)):
        ids = shard_ids[k]()
        if tau.shape[0] != len(ids):
            raise ValueError(f"feature shard {k} has {tau.shape[0]} rows, corpus {len(ids)}")
        top = None
        if explain_targets:
            top = top_contributions(tau, ids, target_ids, target_tasks, explain_targets)
            top = top.append_column("shard", pa.array([k] * top.num_rows, pa.int32()))
        yield ShardScores(k, ids, tau.float().contiguous(), task_means(tau, target_tasks), top)


def soft_thresholded_means(
    tau_shards: Callable[[], Iterable[torch.Tensor]], target_tasks: Sequence[str],
    threshold_sd: float,
) -> Iterator[dict[str, np.ndarray]]:
    """Each shard's task means (task -> [n_k]) of tau soft-thresholded per target at
    ``threshold_sd`` times that target's standard deviation over the pool
    (`trak.soft_threshold`). ``tau_shards()`` yields the pool's tau [n_k, T] shard by shard;
    it is walked twice (the spreads, then the means), so the pool is never in memory."""
    if not threshold_sd > 0:
        raise ValueError(f"threshold_sd must be > 0, got {threshold_sd}")
    spread = trak.column_spread(tau_shards())
    for tau in tau_shards():
        yield task_means(trak.soft_threshold(tau, threshold_sd * spread), target_tasks)
