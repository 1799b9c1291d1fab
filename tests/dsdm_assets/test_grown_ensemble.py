"""Growing the ensemble (num_proxies 2 -> 3) trains and featurises only the new proxy: proxies
0 and 1, their feature shards and their target features are copied from the smaller
ensemble's folders, each checked against the sha256 its manifest recorded. A copy that is
no longer the recorded file is recomputed instead, and comes out byte for byte as it was."""

import copy
import json
from pathlib import Path

import dagster as dg
import pytest

from dsdm_assets.definitions import defs
from dsdm_assets.partitions import crawl_partitions

ASSETS = ["documents", "tokenizer", "tokenized_corpus", "target_tasks", "proxy_checkpoints",
          "gradient_shards", "target_gradients"]


def _materialise(run_config: dict, resources: dict, instance, proxies: int):
    ops = {k: copy.deepcopy(v) for k, v in run_config["ops"].items() if k in ASSETS}
    ops["proxy_checkpoints"]["config"]["num_proxies"] = proxies
    ops["target_tasks"] = {"config": {"tasks": ["wiki_qa"]}}
    result = dg.materialize(list(defs.assets), selection=ASSETS, partition_key="small",
                            instance=instance, resources=resources, run_config={"ops": ops})
    assert result.success
    return result


def _manifest(result, asset: str) -> tuple[Path, dict]:
    (event,) = [e for e in result.get_asset_materialization_events()
                if e.asset_key.to_user_string() == asset]
    path = Path(event.materialization.metadata["manifest_uri"].value.removeprefix("file://"))
    return path.parent, json.loads(path.read_text())


def _files(manifest: dict) -> dict[str, dict]:
    return {f["name"]: f for f in manifest["files"]}


@pytest.fixture(scope="module")
def grown(tmp_path_factory, small_crawl_root, demo_resources, fast_run_config):
    folder = tmp_path_factory.mktemp("grown")
    resources = demo_resources(folder, crawl_root=small_crawl_root)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(crawl_partitions.name, ["small"])
    small = _materialise(fast_run_config, resources, instance, proxies=2)
    features, _ = _manifest(small, "gradient_shards")
    damaged = features / "proxy-01" / "shard-00000.safetensors"
    original = damaged.read_bytes()
    damaged.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one bit: not what was recorded
    large = _materialise(fast_run_config, resources, instance, proxies=3)
    return small, large, original


@pytest.mark.slow
def test_the_new_ensemble_trains_only_the_new_proxy(grown) -> None:
    small, large, _ = grown
    (small_folder, before), (large_folder, after) = (
        _manifest(r, "proxy_checkpoints") for r in (small, large))
    assert large_folder != small_folder
    lent, files = _files(before), _files(after)
    for m in (0, 1):
        for name in ("model.safetensors", "config.json", "subset.parquet", "losses.json"):
            entry = files[f"proxy-{m:02d}/{name}"]
            assert entry["adopted"] and entry["sha256"] == lent[f"proxy-{m:02d}/{name}"]["sha256"]
    assert not files["proxy-02/model.safetensors"]["adopted"]
    assert [p["examples"] for p in after["summary"]["proxies"]][:2] == \
        [p["examples"] for p in before["summary"]["proxies"]]


@pytest.mark.slow
def test_features_are_copied_per_proxy_and_a_changed_one_recomputed(grown) -> None:
    small, large, original = grown
    (_, before), (large_folder, after) = (_manifest(r, "gradient_shards") for r in (small, large))
    shards = after["summary"]["shards"]
    lent, files = _files(before), _files(after)
    assert after["summary"]["files_computed"] == shards + 1  # proxy 2's, and the changed one
    assert after["summary"]["files_reused"] == 2 * shards - 1
    for name, entry in files.items():
        recomputed = name.startswith("proxy-02/") or name == "proxy-01/shard-00000.safetensors"
        assert entry["adopted"] is not recomputed, name
        if not name.startswith("proxy-02/"):
            assert entry["sha256"] == lent[name]["sha256"], name
    assert (large_folder / "proxy-01" / "shard-00000.safetensors").read_bytes() == original


@pytest.mark.slow
def test_target_features_are_copied_per_proxy(grown) -> None:
    small, large, _ = grown
    (_, before), (_, after) = (_manifest(r, "target_gradients") for r in (small, large))
    assert after["summary"]["files_computed"] == 1 and after["summary"]["files_reused"] == 2
    lent, files = _files(before), _files(after)
    for m in (0, 1):
        name = f"proxy-{m:02d}/targets.safetensors"
        assert files[name]["adopted"] and files[name]["sha256"] == lent[name]["sha256"]
    assert not files["proxy-02/targets.safetensors"]["adopted"]
