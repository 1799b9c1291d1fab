"""Jobs over one crawl partition (pass the crawl as the tag dagster/partition), the executor
their steps run under, and the op tags that size each step on a cluster executor.

Everything here is read from ``DSDM_*`` variables when the code location loads: the process
that orchestrates a run and every step process must see the same values (the Ray executor
forwards them to its steps)."""

import json
import os
from collections.abc import Mapping
from typing import Literal

import dagster as dg

EXECUTORS = ("multiprocess", "in_process", "k8s", "ray")
#: Steps that load torch models (proxy training, featurisation, target features, SemDeDup's
#: embeddings, evaluation models, LDS models) against steps that read and write tables.
StepKind = Literal["torch", "cpu"]


def _in_process_settings(config: dict) -> dict:
    (settings,) = config.values()  # one key: in_process or multiprocess
    kept = {k: v for k, v in (settings or {}).items() if k in ("retries", "step_dependency_config")}
    return {"in_process": kept}


#: In-process execution that accepts the run configs' ``execution`` block as the default
#: executor does (``in_process: {}`` or ``multiprocess: {max_concurrent: ...}``), so that
#: DSDM_EXECUTOR=in_process works with every committed run config; a multiprocess block's
#: process settings do not apply to one process and are ignored.
IN_PROCESS_ANY_CONFIG = dg.multi_or_in_process_executor.configured(
    _in_process_settings, name="in_process",
    config_schema=dg.Field(dg.multi_or_in_process_executor.config_schema.config_type,
                           is_required=False, default_value={"in_process": {}}),
)


def _positive(environ: Mapping[str, str], name: str, whole: bool = False) -> float | None:
    """The variable as a number > 0, or None when unset; anything else fails naming it."""
    raw = environ.get(name)
    if not raw:
        return None
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        value = 0
    if not value > 0:
        kind = "a whole number" if whole else "a number"
        raise ValueError(f"{name}={raw!r}: expected {kind} > 0")
    return value


def k8s_gpu_tags(environ: Mapping[str, str]) -> dict:
    """Op tags asking Kubernetes for ``DSDM_K8S_GPUS_PER_STEP`` GPUs for a torch step. The
    k8s job executor reads ``dagster-k8s/config``; other executors ignore it. No tags when
    the variable is unset."""
    gpus = _positive(environ, "DSDM_K8S_GPUS_PER_STEP", whole=True)
    if gpus is None:
        return {}
    limits = {"nvidia.com/gpu": str(gpus)}
    return {"dagster-k8s/config": {"container_config": {"resources": {"limits": limits}}}}


def ray_step_resources(kind: StepKind, environ: Mapping[str, str]) -> dict:
    """What one step asks the Ray cluster for: ``DSDM_RAY_CPUS_PER_STEP`` CPUs (default 1)
    for a table step; ``DSDM_RAY_CPUS_PER_TORCH_STEP`` CPUs (default 1) and
    ``DSDM_RAY_GPUS_PER_STEP`` GPUs (default none; fractions share a GPU) for a torch step.
    Asking for at least one CPU is what makes Ray place a step on a node with free CPUs,
    rather than on the head node, which is where a job asking for nothing runs."""
    if kind == "cpu":
        return {"num_cpus": _positive(environ, "DSDM_RAY_CPUS_PER_STEP") or 1}
    request = {"num_cpus": _positive(environ, "DSDM_RAY_CPUS_PER_TORCH_STEP") or 1}
    gpus = _positive(environ, "DSDM_RAY_GPUS_PER_STEP")
    return request | ({"num_gpus": gpus} if gpus else {})


def step_tags(kind: StepKind, environ: Mapping[str, str]) -> dict:
    """Op tags for one step under the executor ``DSDM_EXECUTOR`` names: the Ray request
    (``dagster-ray/config``) under ``ray``, the GPU limit (``dagster-k8s/config``) of a torch
    step under ``k8s`` or wherever ``DSDM_K8S_GPUS_PER_STEP`` is set; none otherwise."""
    tags = k8s_gpu_tags(environ) if kind == "torch" else {}
    if environ.get("DSDM_EXECUTOR") == "ray":
        tags["dagster-ray/config"] = json.dumps(ray_step_resources(kind, environ))
    return tags


def step_retry_policy(environ: Mapping[str, str]) -> dg.RetryPolicy | None:
    """Retries for a step whose process was lost (a Ray worker or a pod killed, a node
    preempted): ``DSDM_STEP_RETRIES`` times (default 2 under ``ray`` and ``k8s``, none on one
    machine, where a failed step is a bug to see at once). Every step is safe to re-run: it
    adopts the files an interrupted attempt finished and writes the rest atomically."""
    retries = environ.get("DSDM_STEP_RETRIES")
    if retries is None:
        count = 2 if environ.get("DSDM_EXECUTOR") in ("ray", "k8s") else 0
    elif retries.isdigit():
        count = int(retries)
    else:
        raise ValueError(f"DSDM_STEP_RETRIES={retries!r}: expected a whole number >= 0")
    return dg.RetryPolicy(max_retries=count, delay=1) if count else None


#: Variables every Ray step process gets from the launching process: the resources' DSDM_*
#: settings and the instance. Not credentials: a Ray job's environment is shown by the Ray
#: dashboard and kept with the job, so nodes take S3 credentials from their own environment.
RAY_FORWARDED_PREFIXES = ("DSDM_", "DAGSTER_HOME")


def _ray_settings(environ: Mapping[str, str]):
    """The function that turns a run config's ``execution`` block into dagster-ray's: the
    committed configs' ``in_process:``/``multiprocess:`` blocks keep only their retry mode;
    a ``ray:`` block (dagster-ray's own keys, e.g. ``runtime_env``) is passed on."""
    address = environ.get("DSDM_RAY_ADDRESS")
    if not address:
        raise ValueError("DSDM_EXECUTOR=ray needs DSDM_RAY_ADDRESS: the cluster's address "
                         "('auto', 'ray://head:10001' or the dashboard's http://head:8265)")
    forwarded = sorted(k for k in environ if k.startswith(RAY_FORWARDED_PREFIXES))

    def settings(config: dict) -> dict:
        block = dict(config or {})
        ray = dict(block.pop("ray", None) or {})
        retries = next((v.get("retries") for v in block.values() if isinstance(v, dict)
                        and v.get("retries")), None)
        ray = {"address": address, "env_vars": forwarded, **ray}
        return {"ray": ray, **({"retries": retries} if retries else {})}

    return settings


def executor_from_env(environ: Mapping[str, str]) -> dg.ExecutorDefinition:
    """The executor named by ``DSDM_EXECUTOR``: ``multiprocess`` (default; one process per
    step on this machine, ``in_process`` when the run config says so), ``in_process`` (every
    step in the run's process, whatever the run config's ``execution`` block says), ``k8s``
    (dagster-k8s's job executor: one Kubernetes pod per step, GPU requests from
    ``DSDM_K8S_GPUS_PER_STEP``; ``pip install -e '.[k8s]'``) or ``ray`` (dagster-ray's step
    executor: each step a Ray job on the cluster at ``DSDM_RAY_ADDRESS``, sized by
    `ray_step_resources`; ``pip install -e '.[ray]'``)."""
    name = environ.get("DSDM_EXECUTOR") or "multiprocess"
    if name == "multiprocess":
        return dg.multi_or_in_process_executor
    if name == "in_process":
        return IN_PROCESS_ANY_CONFIG
    if name == "k8s":
        try:
            from dagster_k8s import k8s_job_executor
        except ImportError as error:
            raise ValueError("DSDM_EXECUTOR=k8s needs the dagster-k8s package: "
                             "pip install -e '.[k8s]'") from error
        return k8s_job_executor
    if name == "ray":
        try:
            from dagster_ray import ray_executor
        except ImportError as error:
            raise ValueError("DSDM_EXECUTOR=ray needs the dagster-ray package: "
                             "pip install -e '.[ray]'") from error
        return ray_executor.configured(
            _ray_settings(environ), name="ray",
            config_schema=dg.Field(dg.Permissive(), is_required=False, default_value={}))
    raise ValueError(f"DSDM_EXECUTOR={name!r}: choose one of {', '.join(EXECUTORS)}")

TORCH_STEP_TAGS = step_tags("torch", os.environ)
CPU_STEP_TAGS = step_tags("cpu", os.environ)
STEP_RETRY_POLICY = step_retry_policy(os.environ)


selection_job = dg.define_asset_job(
    name="selection_job",
    selection=dg.AssetSelection.all() - dg.AssetSelection.groups("evaluation"),
    description="Run DsDm and the baselines on one crawl: ingest, tokenize, proxies, "
    "gradients, datamodels, selections. The main job (make demo).",
)

evaluation_job = dg.define_asset_job(
    name="evaluation_job",
    selection=dg.AssetSelection.groups("evaluation"),
    description="Train evaluation models on every method's selection, and measure the "
    "datamodels' LDS (minutes to hours). Run after selection_job.",
)
