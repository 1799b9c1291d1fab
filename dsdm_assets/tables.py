"""Small formatting helpers for asset metadata shown in the Dagster UI.

Metadata lands in Dagster's event log, once per materialisation, so every value taken from
the data (a source name, a document id) is bounded here: a crawl with a 5 MB ``source``
string must not write 5 MB events, nor inject rows into a Markdown table.
"""

import polars as pl

#: longest text of one table cell or name taken from the data, in characters
MAX_CELL_CHARS = 120
#: most rows of a Markdown table; the rest are counted in a last row
MAX_TABLE_ROWS = 100


def bounded(text: str, limit: int = MAX_CELL_CHARS) -> str:
    """`text` cut to `limit` characters, with a marker saying how many were left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…(+{len(text) - limit} chars)"


def markdown_cell(value: object, float_digits: int = 3) -> str:
    """One cell: floats rounded; text bounded, on one line, with ``|``, ``\\``, ``<`` and
    ``>`` escaped, so a value cannot end its cell, start a row or become HTML."""
    if isinstance(value, float):
        return f"{value:.{float_digits}f}"
    text = bounded(" ".join(str(value).split()))
    for raw, escaped in (("\\", "\\\\"), ("|", "\\|"), ("<", "&lt;"), (">", "&gt;")):
        text = text.replace(raw, escaped)
    return text


def markdown_table(frame: pl.DataFrame, float_digits: int = 3,
                   max_rows: int = MAX_TABLE_ROWS) -> str:
    """A polars frame as a Markdown table (the UI renders it), at most `max_rows` rows."""
    header = "| " + " | ".join(markdown_cell(c) for c in frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    rows = ["| " + " | ".join(markdown_cell(v, float_digits) for v in row) + " |"
            for row in frame.head(max_rows).iter_rows()]
    if frame.height > max_rows:
        rows.append(f"| … {frame.height - max_rows} more rows |" + " |" * (frame.width - 1))
    return "\n".join([header, rule, *rows])


def metadata_key(prefix: str, name: str) -> str:
    """A metadata key made from a name found in the data (e.g. ``share_<source>``), bounded."""
    return prefix + bounded(name, 60)
