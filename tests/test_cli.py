"""The real command line, as CI and users run it: validate the code location, register a
crawl, `dagster job execute` the main job with a config file, read what landed in DuckDB."""

import duckdb
import pytest


@pytest.mark.slow
def test_dagster_job_execute_runs_the_selection_job(cli_selection_run) -> None:
    cli = cli_selection_run
    assert "crawls added: ['small']" in cli.outputs["add-crawl"].stdout
    bad = cli.run(cli.command("dsdm", "add-crawl", "../etc"), check=False)
    assert bad.returncode == 2 and "invalid crawl name" in bad.stderr

    con = duckdb.connect(str(cli.lineage_db), read_only=True)
    assets = {r[0] for r in con.execute("SELECT DISTINCT asset FROM artifacts").fetchall()}
    assert {"documents", "tokenizer", "tokenized_corpus", "target_tasks", "proxy_checkpoints",
            "gradient_shards", "datamodel_weights", "selected_subset"} <= assets
    assert "evaluations" not in assets  # evaluation has its own job
    examples = con.execute("SELECT count(DISTINCT example_id) FROM scores").fetchone()[0]
    selected = con.execute(
        "SELECT count(*) FROM selections WHERE crawl = 'small' AND method = 'dsdm'").fetchone()[0]
    assert selected == examples // 5 > 0
    con.close()
    report = cli.run(cli.command("dsdm", "report", "small"))
    assert "selected_subset" in report.stdout and "quarantine" in report.stdout
