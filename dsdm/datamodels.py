"""From proxies and feature shards to DsDm scores: the ensemble bookkeeping around `trak`.

`trak.py` holds the estimator's math; this module decides which examples train which proxy,
how feature shards are stored, and how the per-proxy estimates stream into one score per
candidate and target task without holding the pool in memory.
"""

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from dsdm import trak
from dsdm.features import FeatureConfig, Features, featurize
from dsdm.tokenization import attention_mask, to_tensors

FEATURE_FORMAT = "dsdm-features/1"


def proxy_subsets(n: int, num_proxies: int, fraction: float, seed: int) -> list[np.ndarray]:
    """Sorted example indices each proxy trains on: a seeded random ``fraction`` of ``n``.

    Proxies see different subsets, which is what makes the ensemble average informative.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    size = max(1, round(fraction * n))
    subsets = []
    for m in range(num_proxies):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + m)
        subsets.append(np.sort(torch.randperm(n, generator=generator)[:size].numpy()))
    return subsets


def round_subsets(n: int, num_proxies: int, fraction: float, seed: int,
                  previous: np.ndarray) -> list[np.ndarray]:
    """Sorted example indices each proxy of a later round trains on.

    The rule: the previous round's selection (``previous``, indices into the pool) plus a
    seeded random sample of the rest of the pool, ``fraction`` of ``n`` in all, the size of a
    first-round proxy's subset (so a round costs what the first did). The proxies, and so
    the datamodel's linearisation, move towards the data the selection will train on, while
    the random share keeps every example's gradient measured near the pool it is ranked in.
    A selection larger than that size gives each proxy a seeded random part of it instead.
    Proxies differ in their random part (and seed), as in `proxy_subsets`.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    previous = np.asarray(previous, dtype=np.int64)
    if previous.size == 0:
        raise ValueError("the previous round's selection is empty")
    if np.unique(previous).size != previous.size or previous.min() < 0 or previous.max() >= n:
        raise ValueError(f"the previous round's selection must be distinct indices in [0, {n})")
    size = max(1, round(fraction * n))
    rest = np.setdiff1d(np.arange(n), previous)
    subsets = []
    for m in range(num_proxies):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + m)
        if previous.size >= size:
            chosen = previous[torch.randperm(previous.size, generator=generator)[:size].numpy()]
        else:
            extra = torch.randperm(rest.size, generator=generator)[: size - previous.size].numpy()
            chosen = np.concatenate([previous, rest[extra]])
        subsets.append(np.sort(chosen))
    return subsets


def example_ids_digest(example_ids: Sequence[str]) -> str:
    """sha256 of example ids in order: what a feature file's header records
    (``example_ids_sha256``), so it is never paired with other examples."""
    return hashlib.sha256("\n".join(example_ids).encode()).hexdigest()


def features_to_bytes(features: Features, example_ids: Sequence[str], **meta: str) -> bytes:
    """One feature shard as safetensors (no pickle). The header records the example-id hash,
    so a shard is never paired with the wrong corpus shard."""
    digest = example_ids_digest(example_ids)
    tensors = {"phi": features.phi.contiguous(), "q": features.q.contiguous(),
               "margin": features.margin.contiguous()}
    header = {"format": FEATURE_FORMAT, "example_ids_sha256": digest,
              "rows": str(len(example_ids)), **meta}
    return _sorted_header(safetensors_save(tensors, metadata=header))


def _sorted_header(data: bytes) -> bytes:
    """safetensors writes its metadata map in hash order, which differs between processes;
    with sorted keys, equal tensors and metadata give equal bytes (and sha256s) whichever
    process wrote them. The header stays space-padded to 8 bytes, as the format asks."""
    length = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + length]), sort_keys=True, separators=(",", ":"))
    encoded = header.encode() + b" " * (-len(header.encode()) % 8)
    return len(encoded).to_bytes(8, "little") + encoded + data[8 + length :]


def features_from_bytes(data: bytes, source: str) -> Features:
    """A feature shard written by `features_to_bytes`; `source` (its path) names it in the
    ValueError raised for a truncated or foreign file."""
    try:
        tensors = safetensors_load(data)
    except SafetensorError as error:
        raise ValueError(f"{source}: not a readable feature shard ({error})") from error
    missing = sorted({"phi", "q", "margin"} - set(tensors))
    if missing:
        raise ValueError(f"{source}: feature shard without tensor(s) {missing}")
    return Features(phi=tensors["phi"], q=tensors["q"], margin=tensors["margin"])


def feature_header(data: bytes, source: str) -> dict[str, str]:
    """The safetensors metadata of a feature shard (read without loading tensors); a
    ValueError naming `source` when the header is cut or not JSON."""
    length = int.from_bytes(data[:8], "little")
    try:
        if len(data) < 8 + length:
            raise ValueError(f"header of {length} bytes, file of {len(data)}")
        return json.loads(data[8 : 8 + length]).get("__metadata__", {})
    except ValueError as error:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{source}: not a readable feature shard ({error})") from error


def ensemble_scores(
    load_shard: Callable[[int, int], Features],
    num_shards: int,
    target_phi: Sequence[torch.Tensor],
    lam_relative: float = trak.LAMBDA_RELATIVE,
    out_to_loss_weight: bool = True,
) -> Iterator[torch.Tensor]:
    """Yields tau [rows of shard k, T] for k = 0..num_shards-1.

    ``load_shard(m, k)`` returns proxy m's features of corpus shard k; ``target_phi[m]`` is
    G_m [T, d]. ``out_to_loss_weight=False`` leaves q out (`trak.ensemble`). Two passes over
    the shards: one to build each proxy's kernel, one to score.
    Peak memory is one shard per proxy plus M kernels [d, d] (float64).
    """
    num_proxies = len(target_phi)
    inverses = []
    for m in range(num_proxies):
        k = trak.kernel(load_shard(m, s).phi for s in range(num_shards))
        inverses.append(trak.regularised_inverse(k, trak.default_lambda(k, lam_relative)))
    for s in range(num_shards):
        per_proxy, q_per_proxy = [], []
        for m in range(num_proxies):
            shard = load_shard(m, s)
            (block,) = trak.scores([shard.phi], inverses[m], target_phi[m])
            per_proxy.append(block)
            q_per_proxy.append(shard.q)
        yield trak.ensemble(per_proxy, q_per_proxy if out_to_loss_weight else None)


def task_means(tau: torch.Tensor, target_tasks: Sequence[str]) -> dict[str, np.ndarray]:
    """Mean of tau's columns per task: candidate -> predicted loss reduction on that task."""
    tasks = np.asarray(target_tasks)
    if tau.shape[1] != len(tasks):
        raise ValueError(f"tau has {tau.shape[1]} target columns, {len(tasks)} task labels")
    values = tau.to(torch.float64).numpy()
    return {name: values[:, tasks == name].mean(axis=1) for name in sorted(set(tasks))}


def pool_positions(pool_ids: Sequence[str], chosen_ids: Sequence[str]) -> np.ndarray:
    """[K] int64 pool indices of the examples ``chosen_ids`` (e.g. a previous round's
    selection); a ValueError when any is not in the pool (it was made from another one)."""
    position = {e: i for i, e in enumerate(pool_ids)}
    missing = [e for e in chosen_ids if e not in position]
    if missing:
        raise ValueError(f"{len(missing)} of its {len(chosen_ids)} examples are not in this "
                         f"tokenized corpus (e.g. {missing[0]!r}); it was made from another one")
    return np.array([position[e] for e in chosen_ids], dtype=np.int64)


def featurise_table(model: torch.nn.Module, table: pa.Table, config: FeatureConfig, proxy: int,
                    source: str, device: torch.device | str = "cpu") -> tuple[bytes, float]:
    """Proxy ``proxy``'s features of ``table``'s examples (a tokenized examples table) as a
    feature file (`features_to_bytes`, ``source`` in its header), and the seconds
    featurisation took. Proxy m projects with seed + m, for candidates and targets alike."""
    ids, mask = to_tensors(table)
    start = time.perf_counter()
    features = featurize(model, ids, mask, config.model_copy(update={"seed": config.seed + proxy}),
                         attention_mask=attention_mask(table), device=device)
    seconds = time.perf_counter() - start
    data = features_to_bytes(features, table.column("example_id").to_pylist(),
                             proxy=str(proxy), source=source)
    return data, seconds


def feature_stats(data: bytes, source: str) -> tuple[int, int, bool]:
    """(NaN/inf values in phi and q, feature dimension d, whether phi is degenerate) of the
    feature file at ``source``. Degenerate: more than one row and every row the same (e.g.
    all zeros, what a corrupted checkpoint gives), so the file carries no per-example signal."""
    features = features_from_bytes(data, source)
    bad = (~torch.isfinite(features.phi)).sum() + (~torch.isfinite(features.q)).sum()
    phi = features.phi
    degenerate = len(phi) > 1 and bool((phi == phi[:1]).all())
    return int(bad), int(phi.shape[1]), degenerate
