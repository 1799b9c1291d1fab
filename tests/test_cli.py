"""The real command line, as CI and users run it: validate the code location, register a
crawl, `dagster job execute` the main job with a config file, read what landed in DuckDB."""

import duckdb
import pytest

from dsdm.lineage import LineageDB
from dsdm_assets.cli import resolve_selection, selection_diff


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

    diff = cli.run(cli.command("dsdm", "diff", "small", "small:random"))
    assert "A: crawl small, method dsdm, unit example" in diff.stdout
    assert "B: crawl small, method random" in diff.stdout
    for section in ("examples and documents", "source shares", "score drift", "entering", "leaving"):
        assert section in diff.stdout, section
    db = LineageDB(str(cli.lineage_db), read_only=True)
    dsdm, rand = resolve_selection(db, "small"), resolve_selection(db, "small:random")
    assert resolve_selection(db, dsdm["selection_id"]) == dsdm
    itself = selection_diff(db, dsdm["selection_id"], dsdm["selection_id"])
    counts = itself["examples and documents"].to_pylist()
    assert counts[0] == {"unit": "examples", "in_a": selected, "in_b": selected,
                         "shared": selected, "entering": 0, "leaving": 0}
    assert set(itself["source shares (largest change first)"].column("change").to_pylist()) == {0}
    (examples, documents) = selection_diff(db, dsdm["selection_id"], rand["selection_id"])[
        "examples and documents"].to_pylist()
    assert examples["shared"] + examples["entering"] == examples["in_b"] == selected
    assert 0 < examples["entering"] == examples["leaving"]
    assert documents["shared"] + documents["entering"] == documents["in_b"]
    missing = cli.run(cli.command("dsdm", "diff", "nope", "small"), check=False)
    assert missing.returncode == 2 and "no selection for 'nope'" in missing.stderr
    assert "small:dsdm" in missing.stderr
