"""One crawl = one dynamic partition (added by the new-crawl sensor or ``dsdm add-crawl``)."""

import dagster as dg

crawl_partitions = dg.DynamicPartitionsDefinition(name="crawl")
