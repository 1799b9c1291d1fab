"""Measuring selections: evaluation models, target losses, compute multipliers, LDS.

An evaluation model is a fresh GPT-NeoX LM (the proxy architecture, usually larger) trained
with the proxy training loop on exactly one selection, one pass, for a given seed; every
method at the same budget thus gets the same number of tokens and steps. Its quality is the
mean next-token loss over the continuation tokens of each task's `eval` split (the split
selection never sees). The non-target measure is the loss over *every* token of the eval
split's prompt + continuation text ("heldout_text"): general modelling of held-out text the
selection did not target token by token.

Compute multiplier (DsDm paper, Sec. 4): random selections at budgets 1x, 2x (, 4x) trace
loss against training budget; a method's multiplier is the budget (in multiples of 1x) at
which that curve reaches the method's loss, interpolated linearly in log budget. Above 1
means the method's 1x data is worth that many times as much random data.

Linear datamodeling score (LDS, Park et al. 2023): train models on random subsets S_1..S_n;
for each target j, the datamodel predicts loss_j(S) = const - sum_{i in S} tau[i, j] (tau
is a predicted loss *reduction*); LDS_j is the Spearman correlation over the subsets of
predicted and measured loss, averaged over a task's targets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from dsdm import trak
from dsdm.baselines.random import document_keys, uniform_keys
from dsdm.proxy import ProxyConfig, train_proxy
from dsdm.selection import select
from dsdm.tokenization import to_tensors

HELDOUT_TEXT = "heldout_text"


def train_evaluation_model(
    config: ProxyConfig, examples: pa.Table, *, device: torch.device | str = "cpu", bf16: bool = False
) -> tuple[torch.nn.Module, list[float]]:
    """A fresh model trained on the examples table (pool layout) with ``config`` (its seed)."""
    if examples.num_rows == 0:
        raise ValueError("cannot train an evaluation model on an empty selection")
    input_ids, loss_mask = to_tensors(examples)
    result = train_proxy(config, input_ids, loss_mask, device=device, bf16=bf16, log_every=100)
    return result.model, result.losses


@torch.no_grad()
def example_losses(
    model: torch.nn.Module, input_ids: torch.Tensor, loss_mask: torch.Tensor,
    *, batch_size: int = 64, device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Per example: (sum of next-token NLL over scored tokens [N], scored token count [N])."""
    model = model.to(device).eval()
    sums, counts = [], []
    for start in range(0, len(input_ids), batch_size):
        ids = input_ids[start : start + batch_size].to(device)
        mask = loss_mask[start : start + batch_size, 1:].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).view(mask.shape)
        sums.append((nll * mask).sum(1).double().cpu())
        counts.append(mask.sum(1).cpu())
    return torch.cat(sums).numpy(), torch.cat(counts).numpy()


def _scored_views(targets: pa.Table, split: str) -> tuple[torch.Tensor, list[tuple[torch.Tensor, np.ndarray]]]:
    """input_ids [n, L] of ``split``'s rows and the (loss mask [n, L], name per row) pairs
    that define each measure: continuation tokens per task, every token for heldout_text."""
    frame = pl.from_arrow(targets.select(["task", "split"]))
    rows = np.flatnonzero((frame["split"] == split).to_numpy())
    if not len(rows):
        raise ValueError(f"no target examples in split {split!r}")
    chosen = targets.take(pa.array(rows))
    input_ids, continuation = to_tensors(chosen)
    n_tokens = torch.from_numpy(chosen.column("n_tokens").to_numpy().astype(np.int64))
    positions = torch.arange(input_ids.shape[1])[None, :]
    every_token = (positions >= 1) & (positions < n_tokens[:, None])
    tasks = np.asarray(frame["task"].to_numpy()[rows])
    return input_ids, [(continuation, tasks), (every_token, np.full(len(rows), HELDOUT_TEXT))]


def _per_name(sums: np.ndarray, counts: np.ndarray, names: np.ndarray) -> list[dict]:
    out = []
    for name in sorted(set(names.tolist())):
        pick = names == name
        out.append({"task": name, "loss": float(sums[pick].sum() / counts[pick].sum()),
                    "tokens": int(counts[pick].sum())})
    return out


def target_losses(
    model: torch.nn.Module, targets: pa.Table, *, split: str = "eval", batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> pl.DataFrame:
    """Loss per task (mean over continuation tokens of ``split``) plus ``heldout_text``.

    ``targets``: the target_tasks table (pool layout + task, split). Returns columns task,
    loss, tokens; ``heldout_text`` scores every token of the split's prompt + continuation.
    """
    input_ids, views = _scored_views(targets, split)
    out = []
    for mask, names in views:
        sums, counts = example_losses(model, input_ids, mask, batch_size=batch_size, device=device)
        out += _per_name(sums, counts, names)
    return pl.DataFrame(out)


def unigram_log_probs(pool: pa.Table, vocab_size: int) -> torch.Tensor:
    """log p [V] (float64) of a unigram model of the pool's real tokens, add-one smoothed.

    The reference an LM must beat: the regime where selection matters is the one where
    models have learnt well past token frequencies (docs/EVALUATION.md).
    """
    input_ids, _ = to_tensors(pool)
    n_tokens = torch.from_numpy(pool.column("n_tokens").to_numpy().astype(np.int64))
    real = torch.arange(input_ids.shape[1])[None, :] < n_tokens[:, None]
    counts = torch.bincount(input_ids[real], minlength=vocab_size).double() + 1.0
    if counts.numel() != vocab_size:
        raise ValueError(f"pool token ids reach {counts.numel() - 1}, vocab_size is {vocab_size}")
    return (counts / counts.sum()).log()


def unigram_entropy(log_probs: torch.Tensor) -> float:
    """Entropy (nats per token) of the unigram model: its expected loss on the pool."""
    return float(-(log_probs.exp() * log_probs).sum())


def unigram_losses(log_probs: torch.Tensor, targets: pa.Table, *, split: str = "eval") -> pl.DataFrame:
    """`target_losses` of the unigram model: the same tasks, tokens and columns."""
    input_ids, views = _scored_views(targets, split)
    nll = -log_probs[input_ids[:, 1:]]  # token t's loss, for t = 1..L-1
    out = []
    for mask, names in views:
        scored = mask[:, 1:]
        out += _per_name((nll * scored).sum(1).numpy(), scored.sum(1).numpy(), names)
    return pl.DataFrame(out)


@dataclass(frozen=True)
class Multiplier:
    """A method's compute multiplier against random selection, and how it was obtained."""

    value: float
    """Random budget (in multiples of 1x) whose interpolated loss equals the method's."""
    extrapolated: bool
    """True when the loss lies outside the random curve's range (value is then a linear
    extrapolation in log budget from the nearest segment: treat it as a bound)."""


def compute_multiplier(budgets: Sequence[float], losses: Sequence[float], loss: float) -> Multiplier:
    """Where the random curve (budget multiple -> loss) reaches ``loss``, in log budget.

    ``budgets`` are multiples of the 1x budget (e.g. [1, 2, 4]) and ``losses`` the random
    models' losses at them (mean over seeds). The curve is taken piecewise linear in
    log(budget); the first segment whose loss range contains ``loss`` gives the answer.
    """
    b = np.asarray(budgets, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if b.shape != y.shape or len(b) < 2:
        raise ValueError("need at least two random budgets with one loss each")
    if (b <= 0).any() or len(set(b.tolist())) != len(b):
        raise ValueError(f"budgets must be positive and distinct, got {b.tolist()}")
    if not (np.isfinite(y).all() and math.isfinite(loss)):
        raise ValueError("losses must be finite")
    order = np.argsort(b)
    x, y = np.log(b[order]), y[order]
    for i in range(len(x) - 1):
        low, high = sorted((y[i], y[i + 1]))
        if low <= loss <= high and y[i] != y[i + 1]:
            t = (loss - y[i]) / (y[i + 1] - y[i])
            return Multiplier(float(np.exp(x[i] + t * (x[i + 1] - x[i]))), False)
    # outside the curve: extend the nearest end segment (the end whose loss is closer)
    i = 0 if abs(loss - y[0]) < abs(loss - y[-1]) else len(x) - 2
    if y[i] == y[i + 1]:
        raise ValueError("the random curve is flat where the loss lies; cannot interpolate")
    t = (loss - y[i]) / (y[i + 1] - y[i])
    return Multiplier(float(np.exp(x[i] + t * (x[i + 1] - x[i]))), True)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    a = pl.Series(np.asarray(x, dtype=np.float64)).rank("average").to_numpy()
    b = pl.Series(np.asarray(y, dtype=np.float64)).rank("average").to_numpy()
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"need two equal-length sequences of >= 2 values, got {len(a)}, {len(b)}")
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def linear_datamodeling_score(
    tau: np.ndarray, subsets: Sequence[np.ndarray], measured: np.ndarray, target_tasks: Sequence[str],
    threshold_sd: float = 0.0,
) -> pl.DataFrame:
    """Per task: mean over its targets of Spearman(predicted, measured loss) across subsets.

    tau [N, T] (predicted loss reduction of target j from including candidate i); subsets:
    n index arrays into N; measured [n, T] losses of the model trained on each subset.
    ``threshold_sd`` > 0 scores the estimate the selection ranks by: each target's column
    soft-thresholded at that many sd of its values over the pool (`trak.soft_threshold`).
    Also reports ``task_level``: the Spearman over subsets of the task's mean predicted vs
    mean measured loss. Columns: task, lds, lds_sd (over targets), task_level, targets.
    """
    tau = np.asarray(tau, dtype=np.float64)
    if threshold_sd < 0:
        raise ValueError(f"threshold_sd must be >= 0, got {threshold_sd}")
    if threshold_sd:
        columns = torch.from_numpy(tau)
        tau = trak.soft_threshold(columns, threshold_sd * trak.column_spread([columns])).numpy()
    if measured.shape != (len(subsets), tau.shape[1]):
        raise ValueError(f"measured must be [subsets={len(subsets)}, T={tau.shape[1]}], "
                         f"got {measured.shape}")
    predicted = -np.stack([tau[s].sum(axis=0) for s in subsets])  # [n, T]
    tasks = np.asarray(target_tasks)
    rows = []
    for name in sorted(set(tasks.tolist())):
        cols = np.flatnonzero(tasks == name)
        per_target = np.array([spearman(predicted[:, j], measured[:, j]) for j in cols])
        per_target = per_target[np.isfinite(per_target)]
        rows.append({
            "task": name,
            "lds": float(per_target.mean()) if len(per_target) else float("nan"),
            "lds_sd": float(per_target.std()) if len(per_target) else float("nan"),
            "task_level": spearman(predicted[:, cols].mean(1), measured[:, cols].mean(1)),
            "targets": len(cols),
        })
    return pl.DataFrame(rows)


def lds_ceiling(replicates: np.ndarray, seeds: int) -> np.ndarray:
    """[T]: the correlation over subsets that the exact expected loss would reach with the
    mean of ``seeds`` models per subset; what training noise leaves of a perfect LDS.

    replicates [R >= 2, n, T]: R models per subset, each its own seed. Per target, the noise
    variance is the mean over subsets of the variance across a subset's models, and the
    variance of the expected loss across subsets is that of the R-model means less noise / R
    (at least 0); the ceiling is sqrt(signal / (signal + noise / seeds)) (Pearson's, which
    Spearman's follows closely for near-normal losses)."""
    replicates = np.asarray(replicates, dtype=np.float64)
    if replicates.ndim != 3 or replicates.shape[0] < 2 or replicates.shape[1] < 2:
        raise ValueError(f"replicates must be [R >= 2, n >= 2, T], got {replicates.shape}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    noise = replicates.var(axis=0, ddof=1).mean(axis=0)
    signal = np.maximum(replicates.mean(axis=0).var(axis=0, ddof=1) - noise / len(replicates), 0.0)
    total = signal + noise / seeds
    return np.sqrt(np.divide(signal, total, out=np.zeros_like(total), where=total > 0))


def scaled_budget(random_config: dict, multiple: float, pool_tokens: int) -> dict[str, float | int]:
    """The budget of a random selection ``multiple`` times the one ``random_config`` (a
    random_subset manifest's config: fraction or token_budget) kept; a ValueError when the
    pool is too small for it."""
    if random_config.get("token_budget"):
        budget = round(random_config["token_budget"] * multiple)
        if budget > pool_tokens:
            raise ValueError(f"random at {multiple:g}x needs {budget} tokens; the pool has "
                             f"{pool_tokens}: lower random_multiples or the selection budget")
        return {"token_budget": budget}
    fraction = random_config["fraction"] * multiple
    if fraction > 1:
        raise ValueError(f"random at {multiple:g}x the fraction {random_config['fraction']} "
                         "exceeds the pool: lower random_multiples or the selection fraction")
    return {"fraction": fraction}


def random_curve(pool: pa.Table, random_config: dict, multiples: Sequence[float]) -> dict[str, tuple[float, pa.Table]]:
    """``random@<m>x`` -> (m, the examples) for each budget multiple m: the random selection
    ``random_config`` describes (its seed and unit; `dsdm.baselines.random`) continued to m
    times its budget, the examples in corpus order. The pool: example_id, doc_id, n_tokens."""
    doc_ids = pool.column("doc_id").to_numpy(zero_copy_only=False)
    unit = {k: random_config[k] for k in ("unit", "document_score") if k in random_config}
    keys = (document_keys(doc_ids, random_config["seed"]) if unit.get("unit") == "document"
            else uniform_keys(pool.num_rows, random_config["seed"]))
    tokens = pool.column("n_tokens").to_numpy() - 1
    curve = {}
    for multiple in multiples:
        budget = scaled_budget(random_config, multiple, int(tokens.sum()))
        order = select(keys, pool.column("example_id").to_numpy(zero_copy_only=False),
                       tokens, doc_ids=doc_ids, **unit, **budget).order
        curve[f"random@{multiple:g}x"] = (multiple, pool.take(pa.array(np.sort(order))))
    return curve


def target_columns(targets: pa.Table, column_ids: Sequence[str]) -> pa.Table:
    """The rows of ``targets`` (a target_tasks table) for the datamodel's target columns, in
    column order; a ValueError naming columns that are not among the targets."""
    row_of = {e: i for i, e in enumerate(targets.column("example_id").to_pylist())}
    missing = [e for e in column_ids if e not in row_of]
    if missing:
        raise ValueError(f"tau columns name targets missing from target_tasks: {missing[:5]}")
    return targets.take(pa.array([row_of[e] for e in column_ids], pa.int64()))


#: the `task` of the unigram reference row holding the pool's unigram entropy
POOL_ENTROPY = "pool_entropy"


def unigram_reference(pool: pa.Table, targets: pa.Table, vocab_size: int) -> pl.DataFrame:
    """task, loss: a unigram model of the pool on every task and on heldout_text, and the
    pool's unigram entropy (row `POOL_ENTROPY`): what an LM must beat by a margin for the
    comparison to say more than "the model learnt token frequencies"."""
    log_probs = unigram_log_probs(pool, vocab_size)
    frame = unigram_losses(log_probs, targets).select("task", "loss")
    return pl.concat([frame, pl.DataFrame({"task": [POOL_ENTROPY],
                                           "loss": [unigram_entropy(log_probs)]})])
