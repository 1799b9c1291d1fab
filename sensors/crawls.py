"""New-crawl sensor: a finished crawl folder becomes a partition and a selection run.

A crawl is a sub-folder of the ``crawls`` resource's root (local folder or ``s3://``
prefix) and is finished when its ``_SUCCESS`` marker exists, the convention of Spark and
Hadoop writers: a folder still being written is left alone. The cursor remembers which crawls
were requested, so each is requested once; the run key (the crawl name) guards the same
promise should the cursor be reset. A crawl that cannot be used (invalid name, no shards,
unreadable) is logged once and skipped until its marker is written again.
"""

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import dagster as dg
import fsspec

from dsdm.ingest import CrawlError, list_shards
from dsdm_assets.cli import validate_crawl_name
from dsdm_assets.jobs import selection_job
from dsdm_assets.partitions import crawl_partitions
from resources import CrawlSourceResource
from sensors.run_config import run_config_from_env

MARKER = "_SUCCESS"
TRIGGER_TAG = "dsdm/trigger"


@dataclass
class CrawlCursor:
    """What earlier ticks decided: crawls requested, and crawls skipped (with the signature
    of the marker they were skipped at, so rewriting the marker asks for a second look)."""

    requested: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, cursor: str | None) -> "CrawlCursor":
        if not cursor:
            return cls()
        data = json.loads(cursor)
        return cls(list(data.get("requested", [])), dict(data.get("skipped", {})))

    def dump(self) -> str:
        return json.dumps({"requested": self.requested, "skipped": self.skipped}, sort_keys=True)


def _signature(info: Mapping) -> str:
    """When the marker was written: mtime locally, LastModified/ETag on S3."""
    for key in ("mtime", "LastModified", "last_modified", "ETag", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return str(info.get("size"))


def finished_crawls(crawls: CrawlSourceResource) -> dict[str, str]:
    """Folder name -> marker signature, for every sub-folder of the crawl root with a marker.

    Raises FileNotFoundError when the root itself does not exist.
    """
    fs, root = fsspec.core.url_to_fs(crawls.root_url, **crawls.storage_options())
    fs.invalidate_cache()  # a long-lived sensor process must not trust an old listing
    found = {}
    for entry in fs.ls(root.rstrip("/"), detail=True):
        if entry["type"] != "directory":
            continue
        folder = entry["name"].rstrip("/")
        try:
            marker = fs.info(f"{folder}/{MARKER}")
        except FileNotFoundError:
            continue
        found[folder.rsplit("/", 1)[-1]] = _signature(marker)
    return found


def unusable_reason(crawls: CrawlSourceResource, name: str) -> str | None:
    """Why crawl ``name`` cannot become a partition, or None when it can."""
    try:
        validate_crawl_name(name)
    except ValueError as error:
        return str(error)
    try:
        list_shards(crawls.crawl_url(name), crawls.storage_options())
    except CrawlError as error:
        return str(error)
    except OSError as error:
        return f"unreadable: {error}"
    return None


def build_new_crawl_sensor(environ: Mapping[str, str]) -> dg.SensorDefinition:
    """The sensor, with its interval and default status from ``environ``:
    ``DSDM_WATCH_CRAWLS=1`` starts it with the daemon (default: stopped, so ``dagster dev``
    on the demo launches nothing by itself); ``DSDM_WATCH_INTERVAL_S`` (default 60)."""
    try:
        interval = int(environ.get("DSDM_WATCH_INTERVAL_S", "60"))
    except ValueError as error:
        raise ValueError(f"DSDM_WATCH_INTERVAL_S must be whole seconds: {error}") from error
    if interval < 1:
        raise ValueError(f"DSDM_WATCH_INTERVAL_S must be at least 1, got {interval}")
    running = environ.get("DSDM_WATCH_CRAWLS", "").lower() in ("1", "true", "yes")

    @dg.sensor(
        name="new_crawl_sensor", job=selection_job, minimum_interval_seconds=interval,
        default_status=dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED,
        description="Adds each new crawl folder with a _SUCCESS marker under the crawl root as "
        "a partition and launches selection_job on it (once per crawl).",
    )
    def new_crawl_sensor(context: dg.SensorEvaluationContext,
                         crawls: CrawlSourceResource) -> dg.SensorResult:
        cursor = CrawlCursor.load(context.cursor)
        try:
            finished = finished_crawls(crawls)
        except FileNotFoundError:
            return dg.SensorResult(skip_reason=f"crawl root {crawls.root_url} does not exist",
                                   cursor=cursor.dump())
        new = []
        for name, signature in sorted(finished.items()):
            if name in cursor.requested or cursor.skipped.get(name) == signature:
                continue
            reason = unusable_reason(crawls, name)
            if reason:
                context.log.warning(f"crawl folder {name!r} skipped: {reason}")
                cursor.skipped[name] = signature
                continue
            cursor.skipped.pop(name, None)
            cursor.requested.append(name)
            new.append(name)
        if not new:
            return dg.SensorResult(skip_reason="no new finished crawl", cursor=cursor.dump())
        known = set(context.instance.get_dynamic_partitions(crawl_partitions.name))
        to_add = [n for n in new if n not in known]
        run_config = run_config_from_env(os.environ)
        context.log.info(f"new crawls: {new} (partitions added: {to_add})")
        return dg.SensorResult(
            run_requests=[dg.RunRequest(run_key=f"crawl:{name}", partition_key=name,
                                        run_config=run_config, tags={TRIGGER_TAG: "new-crawl"})
                          for name in new],
            dynamic_partitions_requests=[crawl_partitions.build_add_request(to_add)] if to_add else [],
            cursor=cursor.dump(),
        )

    return new_crawl_sensor
