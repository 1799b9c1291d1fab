"""The executor comes from DSDM_EXECUTOR; on Kubernetes every torch step (and only those)
asks for DSDM_K8S_GPUS_PER_STEP GPUs. Checked in a fresh interpreter, as the code location
reads the variables when it loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from dsdm_assets.jobs import IN_PROCESS_ANY_CONFIG, executor_from_env

PROBE = """
import json
from dsdm_assets.definitions import defs
tags = {}
for name in ("selection_job", "evaluation_job"):
    job = defs.resolve_job_def(name)
    for op in job.graph.iterate_op_defs():
        tags[op.name] = op.tags.get("dagster-k8s/config")
print(json.dumps({"executor": job.executor_def.name, "tags": tags}))
"""
TORCH_STEPS = {"proxy_checkpoints", "featurise_gradient_shard", "target_gradients",
               "semdedup_subset", "evaluations", "datamodel_lds"}


def test_k8s_executor_with_a_gpu_request_on_each_torch_step() -> None:
    env = {**os.environ, "DSDM_EXECUTOR": "k8s", "DSDM_K8S_GPUS_PER_STEP": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         check=True, timeout=300)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["executor"] == "k8s"
    requested = {op for op, tag in probe["tags"].items() if tag}
    assert requested == TORCH_STEPS
    for op in TORCH_STEPS:
        limits = json.loads(probe["tags"][op])["container_config"]["resources"]["limits"]
        assert limits == {"nvidia.com/gpu": "1"}


def test_default_and_named_executors() -> None:
    assert executor_from_env({}) is dg.multi_or_in_process_executor
    assert executor_from_env({"DSDM_EXECUTOR": "in_process"}) is IN_PROCESS_ANY_CONFIG
    with pytest.raises(ValueError, match="DSDM_EXECUTOR='celery': choose one of"):
        executor_from_env({"DSDM_EXECUTOR": "celery"})


def _record_pid() -> None:
    with open(os.environ["DSDM_TEST_PID_FILE"], "a") as handle:
        handle.write(f"{os.getpid()}\n")


@dg.asset
def _pid_a() -> None:
    _record_pid()


@dg.asset(deps=[_pid_a])
def _pid_b() -> None:
    _record_pid()


def _pid_job() -> dg.JobDefinition:
    return dg.Definitions(assets=[_pid_a, _pid_b], jobs=[dg.define_asset_job("pids")],
                          executor=IN_PROCESS_ANY_CONFIG).resolve_job_def("pids")


CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_in_process_executor_takes_every_committed_config(path: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DSDM_TEST_PID_FILE", str(tmp_path / "pids"))
    execution = yaml.safe_load(path.read_text()).get("execution", {})
    with dg.instance_for_test() as instance, dg.execute_job(
            dg.reconstructable(_pid_job), instance,
            run_config={"execution": execution} if execution else {}) as result:
        assert result.success
    pids = (tmp_path / "pids").read_text().split()
    assert pids == [str(os.getpid())] * 2  # both steps ran here, even under a multiprocess block
