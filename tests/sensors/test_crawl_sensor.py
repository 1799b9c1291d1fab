"""The new-crawl sensor on a real folder of crawls: each finished crawl becomes one partition
and one run request, exactly once; unfinished, empty and badly named folders are left alone."""

import gzip
import json
from pathlib import Path

import dagster as dg
import pytest

from dsdm_assets.definitions import defs
from dsdm_assets.partitions import crawl_partitions
from resources import CrawlSourceResource
from sensors.crawls import build_new_crawl_sensor

SENSOR = build_new_crawl_sensor({})


def _crawl(root: Path, name: str, rows: list[dict], marker: bool = True) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    if rows:
        with gzip.open(folder / "part-00000.jsonl.gz", "wt", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    if marker:
        (folder / "_SUCCESS").write_text("")
    return folder


def _tick(instance: dg.DagsterInstance, root: Path, cursor: str | None = None):
    """One evaluation, then what the daemon does with its partition requests."""
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, definitions=defs,
        resources={"crawls": CrawlSourceResource(root_url=str(root), tasks_url="unused")},
    )
    data = SENSOR(context)
    for request in data.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return data


@pytest.fixture
def instance():
    with dg.instance_for_test() as instance:
        yield instance


def test_new_crawl_becomes_one_partition_and_one_run_once(tmp_path, instance, demo_rows) -> None:
    _crawl(tmp_path, "crawl-2024-06", demo_rows[:40])
    first = _tick(instance, tmp_path)
    (request,) = first.dynamic_partitions_requests
    assert list(request.partition_keys) == ["crawl-2024-06"]
    (run,) = first.run_requests
    assert run.partition_key == "crawl-2024-06" and run.job_name in (None, "selection_job")
    assert run.run_key == "crawl:crawl-2024-06"
    assert instance.get_dynamic_partitions(crawl_partitions.name) == ["crawl-2024-06"]

    second = _tick(instance, tmp_path, first.cursor)
    assert not second.run_requests and not second.dynamic_partitions_requests
    assert second.skip_reason.skip_message == "no new finished crawl"

    _crawl(tmp_path, "crawl-2024-07", demo_rows[40:80])
    third = _tick(instance, tmp_path, second.cursor)
    assert [r.partition_key for r in third.run_requests] == ["crawl-2024-07"]
    assert instance.get_dynamic_partitions(crawl_partitions.name) == ["crawl-2024-06", "crawl-2024-07"]


def test_folder_without_marker_is_not_picked_up_until_finished(tmp_path, instance, demo_rows) -> None:
    folder = _crawl(tmp_path, "in-progress", demo_rows[:10], marker=False)
    first = _tick(instance, tmp_path)
    assert not first.run_requests and not first.dynamic_partitions_requests
    (folder / "_SUCCESS").write_text("")
    second = _tick(instance, tmp_path, first.cursor)
    assert [r.partition_key for r in second.run_requests] == ["in-progress"]


def test_registered_partition_is_not_added_twice(tmp_path, instance, demo_rows) -> None:
    instance.add_dynamic_partitions(crawl_partitions.name, ["demo"])
    _crawl(tmp_path, "demo", demo_rows[:10])
    data = _tick(instance, tmp_path)
    # already a partition (dsdm add-crawl), never run by the sensor: run it, add nothing
    assert [r.partition_key for r in data.run_requests] == ["demo"]
    assert not data.dynamic_partitions_requests


@pytest.mark.parametrize("name", ["a..b", ".hidden", "with space", "semi;colon", "-dash-first"])
def test_odd_names_are_rejected_and_logged(tmp_path, instance, demo_rows, capsys, name) -> None:
    _crawl(tmp_path, name, demo_rows[:10])
    data = _tick(instance, tmp_path)
    assert not data.run_requests and not data.dynamic_partitions_requests
    assert f"crawl folder {name!r} skipped: invalid crawl name" in capsys.readouterr().err
    assert instance.get_dynamic_partitions(crawl_partitions.name) == []


def test_empty_crawl_is_skipped_with_reason_once_then_retried_after_new_marker(
    tmp_path, instance, demo_rows, capsys
) -> None:
    folder = _crawl(tmp_path, "empty", [])
    (folder / "notes.txt").write_text("no shards here")
    first = _tick(instance, tmp_path)
    assert not first.run_requests
    assert "crawl folder 'empty' skipped: no shards in" in capsys.readouterr().err
    second = _tick(instance, tmp_path, first.cursor)
    assert not second.run_requests and "skipped" not in capsys.readouterr().err  # logged once
    # the crawl is repaired and its marker rewritten: it is looked at again
    with gzip.open(folder / "part-00000.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write(json.dumps(demo_rows[0]) + "\n")
    (folder / "_SUCCESS").unlink()
    (folder / "_SUCCESS").write_text("again")
    third = _tick(instance, tmp_path, second.cursor)
    assert [r.partition_key for r in third.run_requests] == ["empty"]


def test_missing_root_is_a_skip_with_the_path(tmp_path, instance) -> None:
    data = _tick(instance, tmp_path / "nowhere")
    assert not data.run_requests
    assert str(tmp_path / "nowhere") in data.skip_reason.skip_message


def test_run_requests_carry_the_run_config_file(tmp_path, instance, demo_rows, monkeypatch) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("ops:\n  tokenizer:\n    config:\n      vocab_size: 1024\n")
    monkeypatch.setenv("DSDM_RUN_CONFIG", str(config))
    _crawl(tmp_path / "crawls", "c1", demo_rows[:10])
    (run,) = _tick(instance, tmp_path / "crawls").run_requests
    assert run.run_config == {"ops": {"tokenizer": {"config": {"vocab_size": 1024}}}}


def test_status_and_interval_come_from_the_environment() -> None:
    assert SENSOR.default_status == dg.DefaultSensorStatus.STOPPED
    watching = build_new_crawl_sensor({"DSDM_WATCH_CRAWLS": "1", "DSDM_WATCH_INTERVAL_S": "15"})
    assert watching.default_status == dg.DefaultSensorStatus.RUNNING
    assert watching.minimum_interval_seconds == 15
    with pytest.raises(ValueError, match="DSDM_WATCH_INTERVAL_S"):
        build_new_crawl_sensor({"DSDM_WATCH_INTERVAL_S": "soon"})
