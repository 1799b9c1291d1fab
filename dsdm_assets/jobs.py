"""The main job: every asset of one crawl partition, ingest through selection."""

import dagster as dg

selection_job = dg.define_asset_job(
    name="selection_job",
    selection=dg.AssetSelection.all(),
    description="Run DsDm on one crawl: ingest, tokenize, proxies, gradients, datamodels, "
    "selection. Pass the crawl as the partition (tag dagster/partition).",
)
