"""The store layout of each asset's folder, in one place: the file names other steps read,
and the loaders of the artifacts several steps use (tokenizer, proxy, feature shards).

An asset writes its files under ``<asset>/<crawl>/<fingerprint>/`` (`asset_folder`) and its
``manifest.json`` last; each manifest lists its files with a ``kind``. A step made from an
asset gets that asset's `Upstream`: the manifest, its store path and its sha256.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load as safetensors_load
from tokenizers import Tokenizer

from dsdm.datamodels import feature_header, features_from_bytes
from dsdm.features import Features
from dsdm.proxy import load_proxy
from dsdm.store import ArtifactStore
from dsdm.tokenization import tokenizer_from_bytes

MANIFEST = "manifest.json"
# documents
DOCUMENTS = "documents.parquet"
QUARANTINE = "quarantine.parquet"
# tokenizer, target_tasks
TOKENIZER = "tokenizer.json"
TARGETS = "targets.parquet"
# proxy_checkpoints: one folder per proxy; losses.json, written last, marks a proxy finished
CHECKPOINT, PROXY_CONFIG, SUBSET, LOSSES = "model.safetensors", "config.json", "subset.parquet", "losses.json"
#: the files of one finished proxy and their kinds, the marker last
PROXY_FILES = {CHECKPOINT: "checkpoint", PROXY_CONFIG: "config", SUBSET: "subset", LOSSES: "losses"}
# datamodel_weights
SCORES = "scores.parquet"
TARGET_COLUMNS = "target_columns.parquet"
TARGET_TEXT = "target_text.parquet"
CONTRIBUTIONS = "contributions.parquet"
# every selection asset
SELECTION = "manifest.parquet"
# evaluations, datamodel_lds
RESULTS, UNIGRAM, MULTIPLIERS = "results.parquet", "unigram.parquet", "multipliers.parquet"
REPORT, REPORT_PLOT, LDS = "report.md", "report.png", "lds.parquet"
#: datamodel_lds: each LDS model's measured loss on each target (model, example_id, loss)
LDS_LOSSES = "lds_losses.parquet"


def asset_folder(asset: str, crawl: str, fingerprint: str) -> str:
    """Store folder of one materialisation: ``<asset>/<crawl>/<fingerprint>``."""
    return f"{asset}/{crawl}/{fingerprint}"


def corpus_shard(k: int) -> str:
    """tokenized_corpus: examples shard k."""
    return f"shard-{k:05d}.parquet"


def proxy_file(m: int, name: str) -> str:
    """proxy_checkpoints: file ``name`` (one of `PROXY_FILES`) of proxy m."""
    return f"proxy-{m:02d}/{name}"


def mixture_run_file(r: int) -> str:
    """mixture_runs: run r's record (its per-source counts, every task's select-split loss,
    its seconds); each is written whole, so a present file is a finished run."""
    return f"run-{r:03d}.json"


def feature_shard(m: int, k: int) -> str:
    """gradient_shards: proxy m's features of corpus shard k."""
    return f"proxy-{m:02d}/shard-{k:05d}.safetensors"


def target_features(m: int) -> str:
    """target_gradients: proxy m's features of the select-split targets."""
    return f"proxy-{m:02d}/targets.safetensors"


def tau_shard(k: int) -> str:
    """datamodel_weights: tau of corpus shard k against every target column."""
    return f"tau-{k:05d}.safetensors"


def selection_shard(k: int) -> str:
    """Every selection asset: training shard k of the selected examples."""
    return f"examples-{k:05d}.parquet"


@dataclass(frozen=True)
class Upstream:
    """A finished asset folder as the steps made from it see it: its manifest, with the
    manifest's store path and sha256 (the pair lineage records as an input)."""

    path: str
    uri: str
    sha256: str
    manifest: dict[str, Any]

    @property
    def folder(self) -> str:
        return self.path.rsplit("/", 1)[0]

    def path_of(self, name: str) -> str:
        """Store path of a file of this folder, by its name within it."""
        return f"{self.folder}/{name}"

    def files(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The manifest's file entries (name, path, uri, sha256, rows, kind), of one kind."""
        return [f for f in self.manifest["files"] if kind is None or f["kind"] == kind]

    def only(self, kind: str) -> dict[str, Any]:
        """The one file of ``kind`` (a ValueError when there is not exactly one)."""
        (entry,) = self.files(kind)
        return entry


def load_tokenizer(store: ArtifactStore, tokenizer: Upstream) -> Tokenizer:
    """The tokenizer of a tokenizer folder."""
    return tokenizer_from_bytes(store.read_bytes(tokenizer.only("tokenizer")["path"]))


def read_examples(store: ArtifactStore, upstream: Upstream, kind: str = "examples",
                  columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The example shards of a corpus (kind ``examples``) or a selection, in order."""
    for entry in upstream.files(kind):
        yield store.read_parquet(entry["path"], columns=columns)


def checkpoint_paths(proxies: Upstream) -> list[str]:
    """Store paths of the proxies' checkpoints, proxy 0 first."""
    return [f["path"] for f in proxies.files("checkpoint")]


def load_tau(store: ArtifactStore, path: str) -> torch.Tensor:
    """datamodel_weights: one stored tau shard [n_k, T] (float32)."""
    return safetensors_load(store.read_bytes(path))["tau"]


def load_lds_replicates(store: ArtifactStore, path: str, example_ids: list[str]) -> np.ndarray:
    """datamodel_lds: every LDS model's measured loss [replicates, subsets, T], columns in the
    order of ``example_ids`` (tau's target columns); replicate r of subset k is the subset's
    r-th model (a file without the ``replicate`` column has one per subset). A ValueError if
    any model misses a target, or a subset has fewer models than another."""
    table = store.read_parquet(path)
    models = table.column("model").to_numpy()
    replicate = (table.column("replicate").to_numpy() if "replicate" in table.column_names
                 else np.zeros(len(models), dtype=np.int64))
    column = {e: j for j, e in enumerate(example_ids)}
    measured = np.full((int(replicate.max()) + 1, int(models.max()) + 1, len(example_ids)), np.nan)
    for r, k, e, loss in zip(replicate, models, table.column("example_id").to_pylist(),
                             table.column("loss").to_numpy(), strict=True):
        if e in column:
            measured[r, k, column[e]] = loss
    if np.isnan(measured).any():
        raise ValueError(f"{store.uri(path)} lacks {int(np.isnan(measured).sum())} of the "
                         f"{measured.size} (model, target) losses")
    return measured


def load_lds_losses(store: ArtifactStore, path: str, example_ids: list[str],
                    replicates: int | None = None) -> np.ndarray:
    """datamodel_lds: the measured loss of each subset [subsets, T] (`load_lds_replicates`'
    columns): the mean over its models, the expected loss a datamodel predicts, or over its
    first ``replicates`` (None: all); a ValueError when there are fewer."""
    measured = load_lds_replicates(store, path, example_ids)
    keep = len(measured) if replicates is None else replicates
    if not 1 <= keep <= len(measured):
        raise ValueError(f"{store.uri(path)} holds {len(measured)} models per subset, asked for {keep}")
    return measured[:keep].mean(axis=0)


def load_proxy_checkpoint(store: ArtifactStore, checkpoint_path: str,
                          device: torch.device | str = "cpu") -> torch.nn.Module:
    """The proxy whose checkpoint is at ``checkpoint_path``, with the config beside it."""
    config = json.loads(store.read_bytes(checkpoint_path.replace(CHECKPOINT, PROXY_CONFIG)))
    return load_proxy(config, store.read_bytes(checkpoint_path), device=device,
                      source=store.uri(checkpoint_path))


def load_features(store: ArtifactStore, path: str) -> Features:
    """A feature file (phi, q) at store ``path``, checked against its header."""
    return features_from_bytes(store.read_bytes(path), store.uri(path))


def features_header(store: ArtifactStore, path: str) -> dict[str, str]:
    """The header of the feature file at store ``path`` (rows, example ids' sha256, ...)."""
    return feature_header(store.read_bytes(path), store.uri(path))
