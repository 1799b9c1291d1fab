"""Metadata tables: values taken from the data are bounded and cannot break the table."""

import re

import polars as pl

from dsdm_assets.tables import MAX_CELL_CHARS, bounded, markdown_table, metadata_key


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]


def test_a_source_name_cannot_inject_rows_or_html() -> None:
    hostile = "kernel_docs | 0.99 |\n| fake_source | 1.0 |<script>x</script>"
    table = markdown_table(pl.DataFrame({"source": [hostile, "wikipedia"], "share": [0.25, 0.75]}))
    lines = table.split("\n")
    assert len(lines) == 4  # header, rule, two rows: no injected row
    assert all(len(_cells(line)) == 2 for line in lines)
    assert "<script>" not in table and "&lt;script&gt;" in table
    assert _cells(lines[3]) == ["wikipedia", "0.750"]


def test_a_5_mb_value_is_cut_with_a_marker() -> None:
    huge = "x" * 5_000_000
    table = markdown_table(pl.DataFrame({"source": [huge], "n": [1]}))
    assert len(table) < 300
    assert f"…(+{5_000_000 - MAX_CELL_CHARS} chars)" in table
    assert bounded("short") == "short"
    assert len(metadata_key("share_", huge)) < 100 and metadata_key("share_", "wiki") == "share_wiki"


def test_long_tables_are_cut_and_counted() -> None:
    table = markdown_table(pl.DataFrame({"k": list(range(250))}), max_rows=100)
    lines = table.split("\n")
    assert len(lines) == 2 + 100 + 1 and lines[-1].startswith("| … 150 more rows")
    assert _cells(lines[2]) == ["0"] and _cells(lines[101]) == ["99"]
