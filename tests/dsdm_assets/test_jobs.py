"""The executor comes from DSDM_EXECUTOR; on Kubernetes every torch step (and only those)
asks for DSDM_K8S_GPUS_PER_STEP GPUs. Checked in a fresh interpreter, as the code location
reads the variables when it loads."""

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import dagster as dg
import pytest
import yaml

from dsdm_assets.jobs import (
    IN_PROCESS_ANY_CONFIG,
    executor_from_env,
    k8s_gpu_tags,
    ray_step_resources,
    step_retry_policy,
    step_tags,
)

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
TORCH_STEPS = {"proxy_checkpoints", "featurise_gradient_shard", "target_gradients", "mixture_runs",
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


# --- cluster executors: per-step requests and retries -------------------------------------------

def test_gpu_request_per_step_comes_from_the_environment() -> None:
    assert k8s_gpu_tags({}) == {}
    tags = k8s_gpu_tags({"DSDM_K8S_GPUS_PER_STEP": "2"})
    config = tags["dagster-k8s/config"]["container_config"]
    assert config == {"resources": {"limits": {"nvidia.com/gpu": "2"}}}
    for bad in ("0", "one", "-1", "1.5"):
        with pytest.raises(ValueError, match="DSDM_K8S_GPUS_PER_STEP"):
            k8s_gpu_tags({"DSDM_K8S_GPUS_PER_STEP": bad})


def test_ray_requests_per_step_kind() -> None:
    ray = {"DSDM_EXECUTOR": "ray"}
    assert step_tags("torch", {}) == step_tags("cpu", {}) == {}
    assert json.loads(step_tags("cpu", ray)["dagster-ray/config"]) == {"num_cpus": 1}
    assert json.loads(step_tags("torch", ray)["dagster-ray/config"]) == {"num_cpus": 1}
    sized = {**ray, "DSDM_RAY_CPUS_PER_STEP": "2", "DSDM_RAY_CPUS_PER_TORCH_STEP": "4",
             "DSDM_RAY_GPUS_PER_STEP": "0.5"}
    assert ray_step_resources("cpu", sized) == {"num_cpus": 2.0}
    assert ray_step_resources("torch", sized) == {"num_cpus": 4.0, "num_gpus": 0.5}
    for name in ("DSDM_RAY_CPUS_PER_STEP", "DSDM_RAY_GPUS_PER_STEP"):
        for bad in ("0", "-1", "two"):
            with pytest.raises(ValueError, match=f"{name}='{bad}': expected a number > 0"):
                ray_step_resources("torch" if "GPU" in name else "cpu", {name: bad})


def test_retries_only_where_a_step_process_can_be_lost() -> None:
    assert step_retry_policy({}) is None
    assert step_retry_policy({"DSDM_EXECUTOR": "multiprocess"}) is None
    assert step_retry_policy({"DSDM_EXECUTOR": "ray"}).max_retries == 2
    assert step_retry_policy({"DSDM_EXECUTOR": "k8s"}).max_retries == 2
    assert step_retry_policy({"DSDM_EXECUTOR": "ray", "DSDM_STEP_RETRIES": "0"}) is None
    assert step_retry_policy({"DSDM_STEP_RETRIES": "3"}).max_retries == 3
    with pytest.raises(ValueError, match="DSDM_STEP_RETRIES='many'"):
        step_retry_policy({"DSDM_STEP_RETRIES": "many"})


def test_ray_executor_needs_an_address() -> None:
    with pytest.raises(ValueError, match="DSDM_EXECUTOR=ray needs DSDM_RAY_ADDRESS"):
        executor_from_env({"DSDM_EXECUTOR": "ray"})


RAY_PROBE = """
import json, yaml
from dagster._core.system_config.objects import ResolvedRunConfig
from dsdm_assets.definitions import defs
job = defs.resolve_job_def("selection_job")
settings = {}
for path in %r:
    execution = yaml.safe_load(open(path)).get("execution", {})
    resolved = ResolvedRunConfig.build(job, {"execution": execution} if execution else {})
    settings[path] = resolved.execution.execution_engine_config
ops = [op for name in ("selection_job", "evaluation_job")
       for op in defs.resolve_job_def(name).graph.iterate_op_defs()]
tags = {op.name: op.tags.get("dagster-ray/config") for op in ops}
retries = {op.name: op.retry_policy.max_retries for op in ops}
print(json.dumps({"executor": job.executor_def.name, "settings": settings, "tags": tags,
                  "retries": retries}))
"""


def test_ray_executor_takes_every_committed_config_and_sizes_every_step() -> None:
    env = {**os.environ, "DSDM_EXECUTOR": "ray", "DSDM_RAY_ADDRESS": "auto",
           "DSDM_RAY_GPUS_PER_STEP": "1", "DSDM_STORE": "s3://bucket/store",
           "AWS_SECRET_ACCESS_KEY": "not-for-ray"}
    out = subprocess.run([sys.executable, "-c", RAY_PROBE % [str(p) for p in CONFIGS]], env=env,
                         capture_output=True, text=True, check=True, timeout=300)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["executor"] == "ray"
    for path, settings in probe["settings"].items():
        assert settings["ray"]["address"] == "auto", path
        forwarded = set(settings["ray"]["env_vars"])
        assert {"DSDM_STORE", "DSDM_RAY_ADDRESS"} <= forwarded, path
        assert "AWS_SECRET_ACCESS_KEY" not in forwarded  # shown by the Ray dashboard
    requests = {op: json.loads(tag) for op, tag in probe["tags"].items()}
    assert {op for op, r in requests.items() if "num_gpus" in r} == TORCH_STEPS
    assert all(r["num_cpus"] == 1 for r in requests.values())
    assert set(probe["retries"].values()) == {2}


def test_kuberay_manifest_places_steps_as_the_docs_say() -> None:
    manifest = Path(__file__).resolve().parents[2] / "deploy" / "kuberay" / "raycluster.yaml"
    documents = {d["kind"]: d for d in yaml.safe_load_all(manifest.read_text())}
    spec = documents["RayCluster"]["spec"]
    assert spec["rayVersion"] == version("ray")  # the version the project pins
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no step on the head
    groups = {g["groupName"]: g["template"]["spec"]["containers"][0]
              for g in spec["workerGroupSpecs"]}
    assert groups["gpu"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for container in groups.values():
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["DSDM_STORE"].startswith("s3://") and "AWS_SECRET_ACCESS_KEY" not in env
    assert "postgres" in yaml.safe_load(documents["ConfigMap"]["data"]["dagster.yaml"])["storage"]
    assert documents["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
