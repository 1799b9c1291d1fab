"""Every committed run config is valid for selection_job before anything runs, and gives
candidate and target features the same projection (datamodel_weights refuses otherwise)."""

from pathlib import Path

import dagster as dg
import pytest
import yaml

from dsdm_assets.datamodels import GradientConfig
from dsdm_assets.definitions import defs

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_the_expected_configs_exist() -> None:
    assert {"demo.yaml", "bench.yaml", "gpu.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid_for_the_job(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    dg.validate_run_config(defs.resolve_job_def("selection_job"), config)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_candidates_and_targets_share_the_projection(path: Path) -> None:
    ops = yaml.safe_load(path.read_text()).get("ops", {})
    settings = [GradientConfig(**ops.get(name, {}).get("config", {})).model_dump()
                for name in ("gradient_shards", "target_gradients")]
    for s in settings:
        s.pop("batch_size")
    assert settings[0] == settings[1]


def test_an_unknown_key_is_named_before_the_run() -> None:
    config = {"ops": {"target_gradients": {"config": {"target_dims": 256}}}}
    with pytest.raises(dg.DagsterInvalidConfigError, match="target_dims"):
        dg.validate_run_config(defs.resolve_job_def("selection_job"), config)
