"""features_finite refuses what a corrupted checkpoint produces: NaN/inf, or rows all alike."""

import torch

from dsdm.datamodels import feature_stats, features_to_bytes
from dsdm.features import Features
from dsdm_assets.datamodels import _features_finite_check


def _file(phi: torch.Tensor) -> bytes:
    n = len(phi)
    return features_to_bytes(Features(phi=phi, q=torch.ones(n), margin=torch.zeros(n)),
                             [f"ex-{i}" for i in range(n)])


def test_zero_constant_and_nonfinite_feature_files_fail_the_check() -> None:
    gen = torch.Generator().manual_seed(0)
    varied = torch.randn(5, 4, generator=gen)
    nan = varied.clone()
    nan[2, 1] = float("nan")
    cases = {"varied": varied, "zeros": torch.zeros(5, 4), "constant": varied[:1].repeat(5, 1),
             "nan": nan, "one_row": torch.zeros(1, 4)}
    stats = {name: feature_stats(_file(phi), name) for name, phi in cases.items()}
    assert stats == {"varied": (0, 4, False), "zeros": (0, 4, True), "constant": (0, 4, True),
                     "nan": (1, 4, False), "one_row": (0, 4, False)}
    summary = {"nonfinite": 0, "degenerate_files": ["proxy-00/shard-00002.safetensors"]}
    check = _features_finite_check(summary)
    assert check.passed is False
    assert check.metadata["degenerate_files"].value == ["proxy-00/shard-00002.safetensors"]
    assert _features_finite_check({"nonfinite": 0}).passed is True  # a manifest from before
