"""The real command line, as CI and users run it: validate the code location, register a
crawl, `dagster job execute` the main job with a config file, read what landed in DuckDB."""

import duckdb
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load as safetensors_load

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


@pytest.mark.slow
def test_dsdm_explain_prints_scores_weights_and_targets(cli_selection_run) -> None:
    cli = cli_selection_run
    con = duckdb.connect(str(cli.lineage_db), read_only=True)
    (selection_id, top, top_score), = con.execute(
        "SELECT selection_id, example_id, score FROM selections WHERE crawl = 'small' AND "
        "method = 'dsdm' AND rank = 1").fetchall()
    # the view's parts add up to the score the selection ranked by
    (parts,), = con.execute("SELECT sum(counted) FROM explanations WHERE selection_id = ? AND "
                            "example_id = ?", [selection_id, top]).fetchall()
    assert parts == pytest.approx(top_score, rel=1e-9, abs=1e-12)
    scores_id, shard = con.execute(
        "SELECT scores_id, shard FROM target_contributions WHERE example_id = ? LIMIT 1",
        [top]).fetchone()
    stored = con.execute("""SELECT effect, "rank", target_id, tau, prompt FROM explained_targets
                            WHERE scores_id = ? AND example_id = ? ORDER BY effect, "rank" """,
                         [scores_id, top]).fetchall()
    con.close()

    # against the stored tau: the largest and most negative entries of the example's row
    folder = cli.folder / "store" / "datamodel_weights" / "small" / scores_id
    tau = safetensors_load((folder / f"tau-{shard:05d}.safetensors").read_bytes())["tau"]
    ids = _corpus_ids(cli, shard)
    targets = pq.read_table(folder / "target_columns.parquet").column("example_id").to_pylist()
    values = tau[ids.index(top)]
    helps = [r for r in stored if r[0] == "helps"]
    hurts = [r for r in stored if r[0] == "hurts"]
    assert [r[2] for r in helps] == [targets[j] for j in values.argsort(descending=True)[:3]]
    assert [r[2] for r in hurts] == [targets[j] for j in values.argsort()[:3]]
    assert all(r[3] > 0 and r[4] for r in helps) and all(r[3] < 0 for r in hurts)

    out = cli.run(cli.command("dsdm", "explain", "small", top)).stdout
    assert f"selection {selection_id} (crawl small, method dsdm, unit example): selected, rank 1 of" in out
    assert "pool rank 1 of" in out
    for section in ("score per task", "targets it helps most", "targets it hurts most"):
        assert section in out, section
    assert helps[0][2] in out and f"example {top} (document " in out

    missing = cli.run(cli.command("dsdm", "explain", "small", "no-such-example"), check=False)
    assert missing.returncode == 2 and "'no-such-example' is not in crawl 'small''s pool" in missing.stderr
    other = cli.run(cli.command("dsdm", "explain", "small", top, "--selection", "small:random"),
                    check=False)
    assert other.returncode == 2 and "explain needs a DsDm selection" in other.stderr


def _corpus_ids(cli, shard: int) -> list[str]:
    (path,) = (cli.folder / "store" / "tokenized_corpus" / "small").glob(f"*/shard-{shard:05d}.parquet")
    return pq.read_table(path, columns=["example_id"]).column(0).to_pylist()
