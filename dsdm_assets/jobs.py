"""The main job: every asset of one crawl partition, ingest through selection."""

import dagster as dg

from dsdm_assets.partitions import crawl_partitions

selection_job = dg.define_asset_job(
    name="selection_job",
    selection=dg.AssetSelection.all(),
    partitions_def=crawl_partitions,
    description="Run DsDm on one crawl: ingest, tokenize, proxies, gradients, datamodels, "
    "selection. Pass the crawl as the partition (tag dagster/partition).",
)
