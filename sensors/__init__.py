"""Sensors and schedules: the new-crawl sensor and the latest-crawl schedule, configured from
environment variables when the code location loads (see docs/OPERATIONS.md)."""

import os

from sensors.crawls import build_new_crawl_sensor
from sensors.schedules import build_latest_crawl_schedule

__all__ = ["build_latest_crawl_schedule", "build_new_crawl_sensor", "latest_crawl_schedule",
           "new_crawl_sensor"]

new_crawl_sensor = build_new_crawl_sensor(os.environ)
latest_crawl_schedule = build_latest_crawl_schedule(os.environ)
