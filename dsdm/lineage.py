"""Lineage and result tables in one embedded DuckDB file.

Every materialisation records its artifacts (asset, crawl, URI, sha256, config hash, code
version, run id, row count) and the artifacts each was made from, so "why was this document
selected, by which run, from which checkpoints?" is one SQL query. The same file holds the
tables people query: quarantine, scores, selections.

DuckDB allows one writing process at a time. Each call opens a short-lived connection and
retries while another process holds the lock, so concurrent runs serialise their writes
instead of failing.
"""

import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import duckdb
import pyarrow as pa

SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    artifact_id   VARCHAR PRIMARY KEY,   -- fingerprint of (run_id, uri)
    asset         VARCHAR NOT NULL,
    crawl         VARCHAR,
    uri           VARCHAR NOT NULL,
    sha256        VARCHAR NOT NULL,
    size_bytes    BIGINT,
    config_hash   VARCHAR,
    code_version  VARCHAR,
    run_id        VARCHAR,
    row_count     BIGINT,
    reused        BOOLEAN DEFAULT FALSE, -- true when found in the store instead of recomputed
    extra         JSON,
    recorded_at   TIMESTAMP
);
CREATE TABLE IF NOT EXISTS artifact_inputs (
    artifact_id   VARCHAR NOT NULL,      -- the artifact that was made
    input_uri     VARCHAR NOT NULL,      -- what it was made from (uri + content hash)
    input_sha256  VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    crawl         VARCHAR NOT NULL,
    run_id        VARCHAR,
    file          VARCHAR NOT NULL,
    "row"         BIGINT,                -- 0-based row (line) within the file; NULL: whole file
    reason        VARCHAR NOT NULL,
    detail        VARCHAR,
    excerpt       VARCHAR
);
CREATE TABLE IF NOT EXISTS scores (
    crawl         VARCHAR NOT NULL,
    run_id        VARCHAR,
    scores_id     VARCHAR NOT NULL,      -- fingerprint of the datamodel config and inputs
    example_id    VARCHAR NOT NULL,
    task          VARCHAR NOT NULL,
    score         DOUBLE NOT NULL        -- mean predicted target-loss reduction (larger: better)
);
CREATE TABLE IF NOT EXISTS selections (
    crawl         VARCHAR NOT NULL,
    run_id        VARCHAR,
    selection_id  VARCHAR NOT NULL,
    method        VARCHAR NOT NULL,
    "rank"        BIGINT NOT NULL,
    example_id    VARCHAR NOT NULL,
    doc_id        VARCHAR NOT NULL,
    source        VARCHAR,
    score         DOUBLE,                -- the score of the unit that kept the example
    unit          VARCHAR DEFAULT 'example'  -- example, or document (whole documents kept)
);
-- files made before the selection unit existed gain the column (rows: 'example')
ALTER TABLE selections ADD COLUMN IF NOT EXISTS unit VARCHAR DEFAULT 'example';
CREATE TABLE IF NOT EXISTS target_contributions (
    crawl         VARCHAR NOT NULL,
    run_id        VARCHAR,
    scores_id     VARCHAR NOT NULL,      -- the datamodel (scores) the tau values come from
    example_id    VARCHAR NOT NULL,      -- candidate
    shard         INTEGER,               -- its corpus shard
    effect        VARCHAR NOT NULL,      -- helps (largest tau) or hurts (most negative tau)
    "rank"        SMALLINT NOT NULL,     -- 1 = the largest |tau| in that direction
    target_id     VARCHAR NOT NULL,      -- select-split target example
    task          VARCHAR NOT NULL,
    tau           DOUBLE NOT NULL        -- predicted reduction of that target's loss
);
CREATE TABLE IF NOT EXISTS datamodel_targets (
    crawl         VARCHAR NOT NULL,
    scores_id     VARCHAR NOT NULL,
    target_id     VARCHAR NOT NULL,
    task          VARCHAR NOT NULL,
    prompt        VARCHAR,               -- decoded as the proxies saw it (truncated to seq_len)
    continuation  VARCHAR
);
CREATE TABLE IF NOT EXISTS selection_weights (
    crawl         VARCHAR NOT NULL,
    run_id        VARCHAR,
    selection_id  VARCHAR NOT NULL,
    scores_id     VARCHAR NOT NULL,      -- the task scores it mixed
    task          VARCHAR NOT NULL,
    weight        DOUBLE NOT NULL,       -- normalised weight (negative: a task to avoid)
    coefficient   DOUBLE NOT NULL,       -- part = coefficient x score (see the explanations view)
    mixing        VARCHAR DEFAULT 'sum'  -- sum, or max (dsdm.selection.combine_task_scores)
);
-- files made before the max rule existed gain the column (rows: 'sum')
ALTER TABLE selection_weights ADD COLUMN IF NOT EXISTS mixing VARCHAR DEFAULT 'sum';
CREATE TABLE IF NOT EXISTS evaluations (
    crawl         VARCHAR NOT NULL,
    run_id        VARCHAR,
    evaluation_id VARCHAR NOT NULL,      -- fingerprint of the evaluation config and inputs
    method        VARCHAR NOT NULL,      -- dsdm, random, dsir, ...; random@2x for curve points
    selection_id  VARCHAR,               -- the evaluated selection (NULL when drawn here)
    budget        DOUBLE,                -- training budget in multiples of the selection budget
    seed          BIGINT,                -- evaluation model seed (NULL for aggregates)
    task          VARCHAR NOT NULL,      -- target task, or heldout_text
    metric        VARCHAR NOT NULL,      -- loss (nats/token), multiplier, lds, lds_task_level
    value         DOUBLE
);
-- why an example ranks where it does: one row per (selection, example, task); the counted
-- parts sum to its mixed score (the DsDm selection's score): every part under the sum rule;
-- under max, the largest part of the tasks to select for and the parts of the tasks to avoid
CREATE OR REPLACE VIEW explanations AS
WITH parts AS (
    SELECT w.crawl, w.selection_id, s.example_id, s.task, w.weight, w.coefficient, w.mixing,
           s.score AS task_score, w.coefficient * s.score AS part
    FROM selection_weights w
    JOIN scores s ON s.crawl = w.crawl AND s.scores_id = w.scores_id AND s.task = w.task)
SELECT *, CASE WHEN mixing = 'max' AND weight > 0 AND row_number() OVER (
                   PARTITION BY selection_id, example_id, weight > 0 ORDER BY part DESC, task) > 1
               THEN 0.0 ELSE part END AS counted
FROM parts;
-- the target examples each candidate moves most, with their text
CREATE OR REPLACE VIEW explained_targets AS
SELECT c.crawl, c.scores_id, c.example_id, c.effect, c."rank", c.task, c.target_id, c.tau,
       t.prompt, t.continuation
FROM target_contributions c
LEFT JOIN datamodel_targets t USING (crawl, scores_id, target_id);
"""


@dataclass(frozen=True)
class ArtifactRecord:
    """One artifact written (or reused) by a materialisation."""

    asset: str
    uri: str
    sha256: str
    crawl: str | None = None
    size_bytes: int | None = None
    config_hash: str | None = None
    code_version: str | None = None
    run_id: str | None = None
    row_count: int | None = None
    reused: bool = False
    inputs: Sequence[tuple[str, str]] = ()  # (uri, sha256) of what it was made from
    extra: dict[str, Any] = field(default_factory=dict)


log = logging.getLogger(__name__)
#: seconds between "still waiting for the lock" log lines
LOCK_REPORT_S = 10.0


class LineageDB:
    """The lineage/result DuckDB file at ``path`` (created on first use)."""

    def __init__(self, path: str, lock_timeout_s: float = 120.0, read_only: bool = False):
        self.path = path
        self.lock_timeout_s = lock_timeout_s
        self.read_only = read_only
        if read_only:
            if not os.path.exists(path):
                raise FileNotFoundError(f"lineage database {path} does not exist (no run yet?)")
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with self.connect() as con:
            con.execute(SCHEMA)

    @contextmanager
    def connect(self, read_only: bool | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection; waits (with backoff) while another process writes."""
        read_only = self.read_only if read_only is None else read_only
        start = time.monotonic()
        delay, next_report = 0.05, 0.0
        while True:
            try:
                con = duckdb.connect(self.path, read_only=read_only)
                break
            except duckdb.IOException as error:
                if "lock" not in str(error).lower():
                    raise
                waited = time.monotonic() - start
                if waited > self.lock_timeout_s:
                    raise TimeoutError(
                        f"lineage database {self.path} is still locked by another process after "
                        f"{waited:.0f} s (lock_timeout_s {self.lock_timeout_s:g}): {error}"
                    ) from error
                if waited >= next_report:  # at once, then every LOCK_REPORT_S
                    log.warning("lineage database %s is locked by another process; waited %.0f "
                                "of %g s", self.path, waited, self.lock_timeout_s)
                    next_report = waited + LOCK_REPORT_S
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        try:
            yield con
        finally:
            con.close()

    def query(self, sql: str, params: Sequence[Any] | None = None) -> pa.Table:
        """Run a read query and return Arrow (no copies through Python objects)."""
        with self.connect() as con:
            return con.sql(sql, params=list(params or [])).to_arrow_table()

    def record_artifacts(self, records: Sequence[ArtifactRecord]) -> list[str]:
        """Insert artifact rows and their input edges in one transaction; returns their ids."""
        from dsdm.store import fingerprint

        now = datetime.now(UTC).replace(tzinfo=None)
        ids = []
        with self.connect() as con:
            con.execute("BEGIN")
            for rec in records:
                artifact_id = fingerprint(rec.run_id, rec.uri, rec.sha256)
                ids.append(artifact_id)
                con.execute("DELETE FROM artifact_inputs WHERE artifact_id = ?", [artifact_id])
                con.execute(
                    "INSERT OR REPLACE INTO artifacts VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    [
                        artifact_id, rec.asset, rec.crawl, rec.uri, rec.sha256, rec.size_bytes,
                        rec.config_hash, rec.code_version, rec.run_id, rec.row_count, rec.reused,
                        json.dumps(rec.extra, sort_keys=True, default=str), now,
                    ],
                )
                if rec.inputs:
                    con.executemany(
                        "INSERT INTO artifact_inputs VALUES (?,?,?)",
                        [(artifact_id, uri, sha) for uri, sha in rec.inputs],
                    )
            con.execute("COMMIT")
        return ids

    def replace_rows(self, table: str, where: dict[str, Any],
                     rows: pa.Table | pa.RecordBatchReader) -> int:
        """Replace the rows of ``table`` matching ``where`` by ``rows`` atomically; returns
        the number of rows inserted.

        Used for per-crawl result tables (quarantine, scores, selections): a re-run of the
        same step replaces its rows instead of duplicating them. ``rows`` must carry the
        table's columns in order; a RecordBatchReader (see `result_rows`) is inserted as
        DuckDB scans it, so a pool-sized table never has to be assembled in memory.
        """
        if table not in {"quarantine", "scores", "selections", "evaluations",
                         "target_contributions", "datamodel_targets", "selection_weights"}:
            raise ValueError(f"unknown result table {table!r}")
        clause = " AND ".join(f'"{k}" = ?' for k in where) or "TRUE"
        with self.connect() as con:
            con.execute("BEGIN")
            con.execute(f"DELETE FROM {table} WHERE {clause}", list(where.values()))
            con.register("incoming_rows", rows)
            (inserted,) = con.execute(f"INSERT INTO {table} SELECT * FROM incoming_rows").fetchone()
            con.unregister("incoming_rows")
            con.execute("COMMIT")
        return int(inserted)


def result_rows(constants: dict[str, str], batches: Iterable[pa.RecordBatch | pa.Table],
                schema: pa.Schema) -> pa.RecordBatchReader:
    """Rows for a result table, streamed: the ``constants`` columns (crawl, run_id, an id of
    the result) first, then each batch's columns, in ``schema`` order (the table's columns
    after the constants). One batch is built at a time, as `LineageDB.replace_rows` reads."""
    full = pa.schema([pa.field(name, pa.string()) for name in constants] + list(schema))

    def with_constants() -> Iterator[pa.RecordBatch]:
        for part in batches:
            for batch in part.to_batches() if isinstance(part, pa.Table) else [part]:
                n = batch.num_rows
                columns = [pa.array([value] * n, pa.string()) for value in constants.values()]
                columns += [batch.column(field.name).cast(field.type) for field in schema]
                yield pa.RecordBatch.from_arrays(columns, schema=full)

    return pa.RecordBatchReader.from_batches(full, with_constants())
