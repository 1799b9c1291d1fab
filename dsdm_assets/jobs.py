"""Jobs over one crawl partition (pass the crawl as the tag dagster/partition), and the
executor their steps run under."""

from collections.abc import Mapping

import dagster as dg

EXECUTORS = ("multiprocess", "in_process", "k8s")


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


def executor_from_env(environ: Mapping[str, str]) -> dg.ExecutorDefinition:
    """The executor named by ``DSDM_EXECUTOR``: ``multiprocess`` (default; one process per
    step on this machine, ``in_process`` when the run config says so), ``in_process`` (every
    step in the run's process, whatever the run config's ``execution`` block says), or
    ``k8s`` (dagster-k8s's job executor: one Kubernetes pod per step, GPU requests from
    ``DSDM_K8S_GPUS_PER_STEP``; install with ``pip install -e '.[k8s]'``)."""
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
    raise ValueError(f"DSDM_EXECUTOR={name!r}: choose one of {', '.join(EXECUTORS)}")


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
