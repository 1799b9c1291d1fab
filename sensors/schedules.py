"""Daily re-selection: runs selection_job on the most recently added crawl partition, so a
changed run config or target-task set reaches the newest crawl without anyone launching it."""

import os
from collections.abc import Mapping

import dagster as dg
from dagster import DagsterInvalidDefinitionError

from dsdm_assets.jobs import selection_job
from dsdm_assets.partitions import crawl_partitions
from sensors.crawls import TRIGGER_TAG
from sensors.run_config import run_config_from_env

DEFAULT_CRON = "0 3 * * *"


def build_latest_crawl_schedule(environ: Mapping[str, str]) -> dg.ScheduleDefinition:
    """The schedule, with ``DSDM_SCHEDULE_CRON`` as its cron (default daily at 03:00) and
    ``DSDM_SCHEDULE_TZ`` as its time zone (default UTC). It starts with the daemon only when
    ``DSDM_SCHEDULE_CRON`` is set: the demo leaves it stopped."""
    cron = environ.get("DSDM_SCHEDULE_CRON") or DEFAULT_CRON
    running = bool(environ.get("DSDM_SCHEDULE_CRON"))
    try:
        @dg.schedule(
            name="latest_crawl_schedule", job=selection_job, cron_schedule=cron,
            execution_timezone=environ.get("DSDM_SCHEDULE_TZ") or "UTC",
            default_status=dg.DefaultScheduleStatus.RUNNING if running
            else dg.DefaultScheduleStatus.STOPPED,
            description="Re-runs selection_job on the most recently added crawl.",
        )
        def latest_crawl_schedule(context: dg.ScheduleEvaluationContext):
            crawls = context.instance.get_dynamic_partitions(crawl_partitions.name)
            if not crawls:
                return dg.SkipReason("no crawl partition yet: the new-crawl sensor or "
                                     "`dsdm add-crawl NAME` adds one")
            return dg.RunRequest(partition_key=crawls[-1], run_config=run_config_from_env(os.environ),
                                 tags={TRIGGER_TAG: "schedule"})
    except DagsterInvalidDefinitionError as error:
        raise ValueError(f"DSDM_SCHEDULE_CRON={cron!r}: {error}") from error
    return latest_crawl_schedule
