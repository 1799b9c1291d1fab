"""The DuckDB file holding lineage, quarantine, scores and selections."""

import dagster as dg
from pydantic import Field

from dsdm.lineage import LineageDB


class LineageResource(dg.ConfigurableResource):
    """One embedded DuckDB file; every materialisation records its artifacts there."""

    database: str = Field(".dsdm/lineage.duckdb", description="Path of the DuckDB file.")
    lock_timeout_s: float = Field(
        120.0, gt=0, description="How long a writer waits for another process's write lock."
    )

    def get_db(self) -> LineageDB:
        return LineageDB(self.database, self.lock_timeout_s)
