"""The store layout in one place: names, the Upstream view of a manifest, and the loaders of
tokenizer, proxy and feature shards round-trip what the steps wrote."""

import json

import pyarrow as pa
import pytest
import torch

from dsdm.artifacts import (
    CHECKPOINT,
    MANIFEST,
    PROXY_CONFIG,
    PROXY_FILES,
    TOKENIZER,
    Upstream,
    asset_folder,
    checkpoint_paths,
    corpus_shard,
    feature_shard,
    features_header,
    load_features,
    load_lds_losses,
    load_proxy_checkpoint,
    load_tokenizer,
    proxy_file,
    read_examples,
)
from dsdm.datamodels import features_to_bytes
from dsdm.features import Features
from dsdm.proxy import build_proxy, proxy_to_bytes
from dsdm.store import ArtifactStore
from dsdm.tokenization import TokenizerConfig, tokenizer_to_bytes, train_bpe


def _upstream(store: ArtifactStore, asset: str, files: list[dict]) -> Upstream:
    folder = asset_folder(asset, "demo", "0123456789abcdef")
    manifest = {"files": [{**f, "path": f"{folder}/{f['name']}"} for f in files]}
    stored = store.write_json(f"{folder}/{MANIFEST}", manifest)
    return Upstream(f"{folder}/{MANIFEST}", stored.uri, stored.sha256, manifest)


def test_names_are_the_layout_the_store_has() -> None:
    assert asset_folder("gradient_shards", "demo", "abc") == "gradient_shards/demo/abc"
    assert feature_shard(1, 12) == "proxy-01/shard-00012.safetensors"
    assert proxy_file(3, CHECKPOINT) == "proxy-03/model.safetensors"
    assert list(PROXY_FILES)[-1] == "losses.json"  # the marker of a finished proxy, last


def test_upstream_files_by_kind(tmp_path) -> None:
    store = ArtifactStore(str(tmp_path))
    up = _upstream(store, "tokenized_corpus", [{"name": corpus_shard(k), "kind": "examples"}
                                               for k in range(2)])
    assert up.folder == "tokenized_corpus/demo/0123456789abcdef"
    assert [f["name"] for f in up.files("examples")] == [corpus_shard(0), corpus_shard(1)]
    assert up.path_of("x.json") == f"{up.folder}/x.json"
    with pytest.raises(ValueError):
        up.only("examples")


def test_loaders_round_trip(tmp_path, demo_docs, tiny_config) -> None:
    store = ArtifactStore(str(tmp_path))
    tok = train_bpe([d["text"] for d in demo_docs[:50]], TokenizerConfig(vocab_size=300))
    folder = asset_folder("tokenizer", "demo", "0123456789abcdef")
    store.write_bytes(f"{folder}/{TOKENIZER}", tokenizer_to_bytes(tok))
    tok_up = _upstream(store, "tokenizer", [{"name": TOKENIZER, "kind": "tokenizer"}])
    assert load_tokenizer(store, tok_up).encode("hello world").ids == tok.encode("hello world").ids

    model = build_proxy(tiny_config)
    proxies = asset_folder("proxy_checkpoints", "demo", "0123456789abcdef")
    store.write_bytes(f"{proxies}/{proxy_file(0, CHECKPOINT)}", proxy_to_bytes(model))
    store.write_bytes(f"{proxies}/{proxy_file(0, PROXY_CONFIG)}",
                      json.dumps(tiny_config.to_dict()).encode())
    proxies_up = _upstream(store, "proxy_checkpoints",
                           [{"name": proxy_file(0, CHECKPOINT), "kind": "checkpoint"}])
    (path,) = checkpoint_paths(proxies_up)
    loaded = load_proxy_checkpoint(store, path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 loaded.state_dict().values(), strict=True))

    features = Features(phi=torch.ones(2, 3), q=torch.ones(2), margin=torch.zeros(2))
    store.write_bytes("f.safetensors", features_to_bytes(features, ["a", "b"]))
    assert torch.equal(load_features(store, "f.safetensors").phi, features.phi)
    assert features_header(store, "f.safetensors")["rows"] == "2"


def test_lds_losses_load_in_the_target_columns_order(tmp_path) -> None:
    store = ArtifactStore(str(tmp_path))
    rows = pa.table({"model": [1, 0, 0, 1], "example_id": ["b", "a", "b", "a"],
                     "loss": [4.0, 1.0, 2.0, 3.0]})
    store.write_parquet("l.parquet", rows)
    assert load_lds_losses(store, "l.parquet", ["b", "a"]).tolist() == [[2.0, 1.0], [4.0, 3.0]]
    with pytest.raises(ValueError, match="lacks 2 of the 6"):
        load_lds_losses(store, "l.parquet", ["a", "b", "c"])


def test_lds_losses_average_each_subsets_models(tmp_path) -> None:
    store = ArtifactStore(str(tmp_path))
    rows = pa.table({"model": [0, 1, 0, 1], "replicate": [0, 0, 1, 1],
                     "example_id": ["a", "a", "a", "a"], "loss": [1.0, 3.0, 2.0, 7.0]})
    store.write_parquet("l.parquet", rows)
    assert load_lds_losses(store, "l.parquet", ["a"]).tolist() == [[1.5], [5.0]]
    assert load_lds_losses(store, "l.parquet", ["a"], replicates=1).tolist() == [[1.0], [3.0]]
    with pytest.raises(ValueError, match="lacks 1 of the 4"):  # subset 1's second model is missing
        store.write_parquet("m.parquet", rows.slice(0, 3))
        load_lds_losses(store, "m.parquet", ["a"])


def test_read_examples_in_manifest_order(tmp_path) -> None:
    store = ArtifactStore(str(tmp_path))
    folder = asset_folder("tokenized_corpus", "demo", "0123456789abcdef")
    for k in range(2):
        store.write_parquet(f"{folder}/{corpus_shard(k)}", pa.table({"example_id": [f"e{k}"]}))
    up = _upstream(store, "tokenized_corpus", [{"name": corpus_shard(k), "kind": "examples"}
                                               for k in range(2)])
    assert [t.column(0).to_pylist() for t in read_examples(store, up)] == [["e0"], ["e1"]]
