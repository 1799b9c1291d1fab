"""Feature shards and proxy checkpoints as files: exact round trip, and a cut or foreign file
is an error that names the file."""

from __future__ import annotations

import pytest
import torch

from dsdm.datamodels import feature_header, features_from_bytes, features_to_bytes
from dsdm.features import Features
from dsdm.proxy import load_proxy, proxy_to_bytes

SOURCE = "file:///store/gradient_shards/demo/abc/proxy-00/shard-00003.safetensors"


def _shard() -> bytes:
    gen = torch.Generator().manual_seed(0)
    features = Features(phi=torch.randn(6, 8, generator=gen), q=torch.rand(6, generator=gen),
                        margin=torch.randn(6, generator=gen))
    return features_to_bytes(features, [f"ex-{i}" for i in range(6)], proxy="0")


def test_a_shard_round_trips_exactly() -> None:
    data = _shard()
    loaded = features_from_bytes(data, SOURCE)
    again = features_to_bytes(loaded, [f"ex-{i}" for i in range(6)], proxy="0")
    assert again == data
    assert feature_header(data, SOURCE)["rows"] == "6"


@pytest.mark.parametrize("cut", [4, 40, -16])
def test_a_truncated_shard_names_the_file(cut: int) -> None:
    data = _shard()[:cut]
    with pytest.raises(ValueError, match=rf"^{SOURCE}: not a readable feature shard"):
        features_from_bytes(data, SOURCE)
    if cut != -16:  # the header is intact when only the tensor bytes are cut
        with pytest.raises(ValueError, match=rf"^{SOURCE}: not a readable feature shard"):
            feature_header(data, SOURCE)


def test_a_file_without_the_feature_tensors_is_refused(tiny_config, untrained_tiny) -> None:
    with pytest.raises(ValueError, match=r"feature shard without tensor\(s\) \['margin', 'phi', 'q'\]"):
        features_from_bytes(proxy_to_bytes(untrained_tiny), SOURCE)


def test_a_truncated_checkpoint_names_the_file(tiny_config, untrained_tiny) -> None:
    blob = proxy_to_bytes(untrained_tiny)
    with pytest.raises(ValueError, match=r"^proxy-01/model.safetensors: not a readable proxy "
                                         r"checkpoint"):
        load_proxy(tiny_config.to_dict(), blob[: len(blob) // 2], source="proxy-01/model.safetensors")
