"""The real command line, as CI and users run it: validate the code location, register a
crawl, `dagster job execute` the main job with a config file, read what landed in DuckDB."""

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import yaml

BIN = Path(sys.executable).parent


def _run(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_dagster_job_execute_runs_the_selection_job(tmp_path, small_crawl_root, fast_run_config):
    repo = Path(__file__).resolve().parents[1]
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"execution": {"config": {"in_process": {}}},
                                      **fast_run_config}))
    env = {**os.environ, "DAGSTER_HOME": str(home), "DSDM_CRAWL_ROOT": str(small_crawl_root),
           "DSDM_STORE": str(tmp_path / "store"), "DSDM_LINEAGE_DB": str(tmp_path / "l.duckdb"),
           "DSDM_DEVICE": "cpu"}

    _run([str(BIN / "dagster"), "definitions", "validate", "-m", "dsdm_assets.definitions"],
         env, repo)
    added = _run([str(BIN / "dsdm"), "add-crawl", "small"], env, repo)
    assert "crawls added: ['small']" in added.stdout
    bad = subprocess.run([str(BIN / "dsdm"), "add-crawl", "../etc"], env=env, cwd=repo,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid crawl name" in bad.stderr
    _run([str(BIN / "dagster"), "job", "execute", "-m", "dsdm_assets.definitions",
          "-j", "selection_job", "-c", str(config),
          "--tags", json.dumps({"dagster/partition": "small"})], env, repo)

    con = duckdb.connect(str(tmp_path / "l.duckdb"), read_only=True)
    assets = {r[0] for r in con.execute("SELECT DISTINCT asset FROM artifacts").fetchall()}
    assert assets == {"documents", "tokenizer", "tokenized_corpus", "target_tasks",
                      "proxy_checkpoints", "gradient_shards", "datamodel_weights",
                      "selected_subset"}
    examples = con.execute("SELECT count(DISTINCT example_id) FROM scores").fetchone()[0]
    selected = con.execute("SELECT count(*) FROM selections WHERE crawl = 'small'").fetchone()[0]
    assert selected == examples // 5 > 0
    con.close()
    report = _run([str(BIN / "dsdm"), "report", "small"], env, repo)
    assert "selected_subset" in report.stdout and "quarantine" in report.stdout
