"""The code location: ``dagster dev`` (via workspace.yaml) and ``dagster job execute -m
dsdm_assets.definitions`` both load ``defs`` from here."""

import dagster as dg

from dsdm_assets import datamodels, ingest, selection
from dsdm_assets.jobs import selection_job
from resources import default_resources

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([ingest, datamodels, selection]),
    jobs=[selection_job],
    resources=default_resources(),
)
