"""DsDm: model-aware dataset selection (Engstrom, Feldmann, Madry, ICML 2024).

The engine: plain Python + torch + polars/pyarrow, no orchestrator. Modules by role:
``ingest`` (crawl -> documents), ``tokenization`` (tokenizer, fixed-length examples),
``tasks`` (target tasks), ``store`` (artifact store), ``lineage`` (DuckDB tables).
"""

__version__ = "0.1.0"
