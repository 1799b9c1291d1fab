"""A selection drawn almost entirely from one source of a mixed pool is flagged by the
`source_mix` asset check as a warning: the run still succeeds, the check says which source."""

import gzip
import json

import dagster as dg

from dsdm_assets.definitions import defs

ASSETS = ["documents", "tokenizer", "tokenized_corpus", "random_subset"]


def test_a_one_source_selection_is_a_warning_not_a_failure(tmp_path, demo_rows, demo_resources) -> None:
    # 400 Wikipedia articles and 4 recipes: a 20% random sample is ~99% Wikipedia
    rows = [r for r in demo_rows if r["source"] == "wikipedia"]
    rows += [r for r in demo_rows if r["source"] == "recipes"][:4]
    (tmp_path / "crawls" / "lopsided").mkdir(parents=True)
    with gzip.open(tmp_path / "crawls" / "lopsided" / "part-0.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("crawl", ["lopsided"])
    result = dg.materialize(
        [a for a in defs.assets if a.key.to_user_string() in ASSETS], partition_key="lopsided",
        instance=instance, resources=demo_resources(tmp_path, crawl_root=tmp_path / "crawls"),
        run_config={"ops": {"tokenizer": {"config": {"vocab_size": 512}}}})
    assert result.success
    (check,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "source_mix"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    assert check.metadata["source"].value == "wikipedia"
    assert check.metadata["selected_share"].value >= 0.9
    assert "wikipedia" in check.description
