"""The schedule re-runs selection on the most recently added crawl; its cron and status come
from the environment, and it stays off unless a cron is given."""

import datetime

import dagster as dg
import pytest

from dsdm_assets.partitions import crawl_partitions
from sensors.schedules import DEFAULT_CRON, build_latest_crawl_schedule


def _evaluate(schedule: dg.ScheduleDefinition, instance: dg.DagsterInstance):
    context = dg.build_schedule_context(
        instance=instance,
        scheduled_execution_time=datetime.datetime(2024, 6, 2, 3, tzinfo=datetime.UTC))
    return schedule(context)


def test_runs_the_most_recently_added_crawl(tmp_path, monkeypatch) -> None:
    config = tmp_path / "bench.yaml"
    config.write_text("ops:\n  selected_subset:\n    config:\n      fraction: 0.1\n")
    monkeypatch.setenv("DSDM_RUN_CONFIG", str(config))
    schedule = build_latest_crawl_schedule({})
    with dg.instance_for_test() as instance:
        skipped = _evaluate(schedule, instance)
        assert isinstance(skipped, dg.SkipReason) and "no crawl partition" in skipped.skip_message
        instance.add_dynamic_partitions(crawl_partitions.name, ["crawl-b", "crawl-a"])
        instance.add_dynamic_partitions(crawl_partitions.name, ["crawl-0"])
        request = _evaluate(schedule, instance)
    assert request.partition_key == "crawl-0"  # added last, although it sorts first
    assert request.run_config == {"ops": {"selected_subset": {"config": {"fraction": 0.1}}}}
    assert request.tags["dsdm/trigger"] == "schedule"


def test_cron_and_status_come_from_the_environment() -> None:
    demo = build_latest_crawl_schedule({})
    assert demo.cron_schedule == DEFAULT_CRON
    assert demo.default_status == dg.DefaultScheduleStatus.STOPPED
    hourly = build_latest_crawl_schedule({"DSDM_SCHEDULE_CRON": "15 * * * *",
                                          "DSDM_SCHEDULE_TZ": "Europe/Paris"})
    assert hourly.cron_schedule == "15 * * * *"
    assert hourly.execution_timezone == "Europe/Paris"
    assert hourly.default_status == dg.DefaultScheduleStatus.RUNNING
    assert hourly.job_name == "selection_job"


def test_bad_cron_names_the_variable() -> None:
    with pytest.raises(ValueError, match="DSDM_SCHEDULE_CRON='every day'"):
        build_latest_crawl_schedule({"DSDM_SCHEDULE_CRON": "every day"})


def test_a_run_config_value_its_step_refuses_fails_the_tick(tmp_path, monkeypatch) -> None:
    config = tmp_path / "bench.yaml"
    config.write_text("ops:\n  selected_subset:\n    config:\n      fraction: 1.5\n")
    monkeypatch.setenv("DSDM_RUN_CONFIG", str(config))
    schedule = build_latest_crawl_schedule({})
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(crawl_partitions.name, ["crawl-0"])
        with pytest.raises(Exception, match=r"(?s)bench.yaml: 1 invalid run-config value.*"
                                            r"ops.selected_subset.config.fraction"):
            _evaluate(schedule, instance)
