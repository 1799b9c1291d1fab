"""The code location: ``dagster dev`` (via workspace.yaml) and ``dagster job execute -m
dsdm_assets.definitions`` both load ``defs`` from here."""

import os

import dagster as dg

from dsdm_assets import datamodels, evaluation, ingest, mixtures, selection
from dsdm_assets.jobs import evaluation_job, executor_from_env, selection_job
from resources import env_resources
from sensors import latest_crawl_schedule, new_crawl_sensor

ASSETS = dg.load_assets_from_modules([ingest, datamodels, mixtures, selection, evaluation])

defs = dg.Definitions(
    assets=ASSETS,
    jobs=[selection_job, evaluation_job],
    sensors=[new_crawl_sensor],
    schedules=[latest_crawl_schedule],
    resources=env_resources(),
    executor=executor_from_env(os.environ),
)


def selection_job_from_env() -> dg.JobDefinition:
    """selection_job with resources bound to the DSDM_* variables set when called, not when
    this module was first imported. For launching from Python with a multiprocess executor:
    ``dg.execute_job(dg.reconstructable(selection_job_from_env), instance, run_config=...)``;
    every step's process calls it again and sees the same variables."""
    return dg.Definitions(assets=ASSETS, jobs=[selection_job], resources=env_resources(),
                          executor=executor_from_env(os.environ)).resolve_job_def("selection_job")
