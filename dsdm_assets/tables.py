"""Small formatting helpers for asset metadata shown in the Dagster UI."""

import polars as pl


def markdown_table(frame: pl.DataFrame, float_digits: int = 3) -> str:
    """A polars frame as a Markdown table (the UI renders it)."""
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    rows = []
    for row in frame.iter_rows():
        cells = [f"{v:.{float_digits}f}" if isinstance(v, float) else str(v) for v in row]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([header, rule, *rows])
