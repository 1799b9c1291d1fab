"""Every committed run config is valid for selection_job before anything runs; the
projection is configured once (target_gradients has no projection settings); a value its
step would refuse (infinite, out of range) is named before the first step."""

from pathlib import Path

import dagster as dg
import pytest
import yaml

from dsdm_assets.config import (
    StepConfig,
    check_run_config,
    run_config_problems,
    step_config_validators,
)
from dsdm_assets.definitions import ASSETS, defs
from dsdm_assets.ingest import TargetTasksConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_the_expected_configs_exist() -> None:
    assert {"demo.yaml", "bench.yaml", "gpu.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid_for_the_job(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    dg.validate_run_config(defs.resolve_job_def("selection_job"), config)


def test_a_target_projection_cannot_be_configured() -> None:
    """Only speed settings are target_gradients' own: a projection setting there is refused
    before the run, naming it, instead of yielding targets featurised unlike the candidates."""
    config = {"ops": {"target_gradients": {"config": {"target_dim": 256, "batch_size": 8}}}}
    with pytest.raises(dg.DagsterInvalidConfigError, match="target_dim"):
        dg.validate_run_config(defs.resolve_job_def("selection_job"), config)
    dg.validate_run_config(defs.resolve_job_def("selection_job"),
                           {"ops": {"target_gradients": {"config": {"batch_size": 8}}}})


def test_an_unknown_key_is_named_before_the_run() -> None:
    config = {"ops": {"gradient_shards": {"config": {"target_dims": 256}}}}
    with pytest.raises(dg.DagsterInvalidConfigError, match="target_dims"):
        dg.validate_run_config(defs.resolve_job_def("selection_job"), config)


# --- value constraints, checked before any step runs -----------------------------------------

SELECTION_JOB = defs.resolve_job_def("selection_job")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_value_of_a_committed_config_passes_its_step(path: Path) -> None:
    check_run_config(yaml.safe_load(path.read_text()), str(path), SELECTION_JOB)


def test_every_asset_config_is_checked_and_refuses_infinity() -> None:
    validators = step_config_validators(ASSETS)
    assert set(validators) == {a.node_def.name for a in ASSETS}
    for name, validate in validators.items():
        validate({})  # every key has a default
        owner = getattr(validate, "__self__", None)  # an op's config class (graphs: a mapping)
        if isinstance(owner, type):
            assert issubclass(owner, StepConfig), name
            assert owner.model_config.get("allow_inf_nan") is False, name


def test_bad_values_are_all_named_with_their_path() -> None:
    config = {"ops": {
        "datamodel_weights": {"config": {"lambda_relative": float("inf")}},
        "proxy_checkpoints": {"config": {"model": {"lr": float("nan"), "warmup_steps": -1}}},
        "selected_subset": {"config": {"fraction": 0.2}},
    }}
    problems = run_config_problems(config, step_config_validators(ASSETS))
    assert sorted(p.split(":")[0] for p in problems) == [
        "ops.datamodel_weights.config.lambda_relative",
        "ops.proxy_checkpoints.config.model.lr",
        "ops.proxy_checkpoints.config.model.warmup_steps"]
    assert "finite number (got inf)" in problems[0]
    with pytest.raises(ValueError, match=r"run.yaml: 3 invalid run-config value"):
        check_run_config(config, "run.yaml", SELECTION_JOB)


def test_too_few_mixture_runs_are_refused_with_the_remedy() -> None:
    validators = step_config_validators(ASSETS)
    (problem,) = run_config_problems({"ops": {"mixture_runs": {"config": {"runs": 2}}}}, validators)
    assert problem.startswith("ops.mixture_runs.config.runs: ")
    assert "at least 3 runs" in problem and "or 0" in problem
    assert run_config_problems({"ops": {"mixture_runs": {"config": {"runs": 0}}}}, validators) == []


@pytest.mark.parametrize(("asset", "seeds_from"), [("mixture_runs", "mixture_runs.seed"),
                                                    ("evaluations", "evaluations.seeds")])
def test_a_model_seed_the_step_replaces_is_refused(asset: str, seeds_from: str) -> None:
    validators = step_config_validators(ASSETS)
    config = {"ops": {asset: {"config": {"model": {"seed": 7}}}}}
    (problem,) = run_config_problems(config, validators)
    assert problem.startswith(f"ops.{asset}.config.model: ") and seeds_from in problem
    # the proxies' model.seed is used (proxy m trains with seed + m), so it stays allowed
    used = {"ops": {"proxy_checkpoints": {"config": {"model": {"seed": 7}}}}}
    assert run_config_problems(used, validators) == []


def test_a_graph_asset_value_is_refused_at_the_check() -> None:
    # gradient_shards takes its config through a config mapping, which Dagster's check runs
    config = {"ops": {"gradient_shards": {"config": {"target_dim": 0}}}}
    with pytest.raises(ValueError, match="target_dim"):
        check_run_config(config, "run.yaml", SELECTION_JOB)


def test_dsdm_check_config_command(tmp_path, capsys) -> None:
    from dsdm_assets.cli import main

    assert main(["check-config", str(CONFIGS[0])]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"ops": {"datamodel_weights": {"config": {
        "lambda_relative": float("inf")}}}}))
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "ops.datamodel_weights.config.lambda_relative" in err


def test_the_task_config_refuses_a_path_before_the_run() -> None:
    assert TargetTasksConfig(tasks=["wiki_qa", "tech_faq"]).tasks == ["wiki_qa", "tech_faq"]
    with pytest.raises(ValueError, match=r"tasks\.?\n?.*'\.\./secret' is not a name"):
        TargetTasksConfig(tasks=["wiki_qa", "../secret"])
