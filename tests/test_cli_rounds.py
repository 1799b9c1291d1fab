"""`dsdm rounds`: round 2's proxies train on round 1's DsDm selection plus a random rest; each
round is its own run with lineage to the previous selection, and what did not change is reused."""

import json

import duckdb
import pyarrow.parquet as pq
import pytest


@pytest.mark.slow
def test_two_rounds_chain_selections_and_reuse_what_did_not_change(tmp_path, make_cli) -> None:
    cli = make_cli(tmp_path)
    cli.run(cli.command("dsdm", "add-crawl", "small"))
    refused = cli.run(cli.command("dsdm", "rounds", "small", "--rounds", "0"), check=False)
    assert refused.returncode == 2 and "--rounds must be at least 1, got 0" in refused.stderr
    unknown = cli.run(cli.command("dsdm", "rounds", "nope", "-c", str(cli.run_config)), check=False)
    assert unknown.returncode == 2 and "crawl 'nope' is not registered" in unknown.stderr

    out = cli.run(cli.command("dsdm", "rounds", "small", "--rounds", "2", "-c", str(cli.run_config)))
    lines = out.stdout.splitlines()
    header = lines.index("round  selection          previous_selection")
    (_, first, none), (_, second, previous) = (lines[header + k].split() for k in (1, 2))
    assert none == "-" and previous == first != second
    assert f"dsdm diff {first} {second}" in out.stdout

    con = duckdb.connect(str(cli.lineage_db), read_only=True)
    runs = dict(con.execute("SELECT selection_id, any_value(run_id) FROM selections "
                            "WHERE method = 'dsdm' GROUP BY 1").fetchall())
    assert set(runs) == {first, second}
    # round 2 reused every asset upstream of the proxies, and made new proxies from round 1's
    # selection: the lineage edge from proxy_checkpoints to that selection's manifest
    reused = dict(con.execute("SELECT asset, bool_and(reused) FROM artifacts WHERE run_id = ? "
                              "GROUP BY 1", [runs[second]]).fetchall())
    for asset in ("documents", "tokenizer", "tokenized_corpus", "target_tasks", "random_subset"):
        assert reused[asset] is True, asset
    assert reused["proxy_checkpoints"] is False and reused["datamodel_weights"] is False
    (edge,), = con.execute("""
        SELECT DISTINCT s.config_hash FROM artifacts p
        JOIN artifact_inputs i ON i.artifact_id = p.artifact_id
        JOIN artifacts s ON s.uri = i.input_uri AND s.asset = 'selected_subset'
        WHERE p.asset = 'proxy_checkpoints' AND p.run_id = ?""", [runs[second]]).fetchall()
    assert edge == first
    selected = {r[0] for r in con.execute(
        "SELECT example_id FROM selections WHERE selection_id = ?", [first]).fetchall()}
    con.close()

    folders = list((cli.folder / "store" / "proxy_checkpoints" / "small").iterdir())
    (later,) = [f for f in folders
                if json.loads((f / "manifest.json").read_text())["config"].get("previous_selection")]
    manifest = json.loads((later / "manifest.json").read_text())
    assert manifest["summary"]["previous_selected"] == len(selected)
    first_round = json.loads(next(f for f in folders if f != later).joinpath("manifest.json").read_text())
    for proxy in ("proxy-00", "proxy-01"):
        seen = set(pq.read_table(later / proxy / "subset.parquet").column("example_id").to_pylist())
        assert selected <= seen  # the whole previous selection, plus a random rest
        size = first_round["summary"]["proxies"][int(proxy[-1])]["examples"]
        assert len(seen) == size  # as many examples (and steps) as a first-round proxy
