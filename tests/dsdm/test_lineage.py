"""Lineage DB: artifact rows with input edges, per-crawl row replacement, concurrent writers."""

import multiprocessing
from pathlib import Path

import pyarrow as pa
import pytest

from dsdm.lineage import ArtifactRecord, LineageDB, result_rows


def test_artifacts_and_their_inputs_are_one_query_away(tmp_path: Path) -> None:
    db = LineageDB(str(tmp_path / "l.duckdb"))
    db.record_artifacts([
        ArtifactRecord("documents", "file:///s/docs.parquet", "d1", crawl="c", run_id="r1",
                       row_count=10, inputs=[("file:///crawl/part-0.jsonl.gz", "raw1")]),
        ArtifactRecord("tokenized_corpus", "file:///s/shard-0.parquet", "t1", crawl="c",
                       run_id="r1", inputs=[("file:///s/docs.parquet", "d1")]),
    ])
    upstream = db.query(
        """SELECT up.asset, up.uri FROM artifacts a
           JOIN artifact_inputs i USING (artifact_id)
           JOIN artifacts up ON up.uri = i.input_uri AND up.sha256 = i.input_sha256
           WHERE a.asset = 'tokenized_corpus'"""
    ).to_pylist()
    assert upstream == [{"asset": "documents", "uri": "file:///s/docs.parquet"}]


def _quarantine(crawl: str, n: int) -> pa.Table:
    return pa.table({
        "crawl": [crawl] * n, "run_id": ["r"] * n, "file": ["f"] * n, "row": list(range(n)),
        "reason": ["too_short"] * n, "detail": [None] * n, "excerpt": ["x"] * n,
    })


def test_replace_rows_replaces_only_the_matching_crawl(tmp_path: Path) -> None:
    db = LineageDB(str(tmp_path / "l.duckdb"))
    db.replace_rows("quarantine", {"crawl": "a"}, _quarantine("a", 3))
    db.replace_rows("quarantine", {"crawl": "b"}, _quarantine("b", 2))
    db.replace_rows("quarantine", {"crawl": "a"}, _quarantine("a", 1))
    counts = db.query("SELECT crawl, count(*) n FROM quarantine GROUP BY 1 ORDER BY 1").to_pylist()
    assert counts == [{"crawl": "a", "n": 1}, {"crawl": "b", "n": 2}]
    with pytest.raises(ValueError, match="unknown result table"):
        db.replace_rows("artifacts", {}, _quarantine("a", 1))


def _write_many(path: str, crawl: str, count: int) -> None:
    db = LineageDB(path)
    for i in range(count):
        db.record_artifacts([ArtifactRecord("x", f"file:///{crawl}/{i}", str(i), crawl=crawl,
                                            run_id=crawl)])


def test_streamed_rows_equal_one_table_and_are_built_a_batch_at_a_time(tmp_path: Path) -> None:
    db = LineageDB(str(tmp_path / "l.duckdb"))
    n = 10_000
    long = pa.table({"example_id": [f"e{i}" for i in range(n)], "task": ["t"] * n,
                     "score": pa.array(range(n), pa.float64())})
    built = []

    def batches():
        for start in range(0, n, 3_000):
            built.append(start)
            yield long.slice(start, 3_000)

    schema = pa.schema([("example_id", pa.string()), ("task", pa.string()),
                        ("score", pa.float64())])
    reader = result_rows({"crawl": "c", "run_id": "r", "scores_id": "s"}, batches(), schema)
    assert built == []  # nothing is built before DuckDB reads
    assert db.replace_rows("scores", {"crawl": "c", "scores_id": "s"}, reader) == n
    assert built == [0, 3_000, 6_000, 9_000]
    stored = db.query("SELECT * FROM scores ORDER BY score")
    assert stored.column("example_id").to_pylist() == long.column("example_id").to_pylist()
    assert set(stored.column("crawl").to_pylist()) == {"c"}
    assert set(stored.column("scores_id").to_pylist()) == {"s"}
    again = result_rows({"crawl": "c", "run_id": "r2", "scores_id": "s"}, [long.slice(0, 5)],
                        schema)
    assert db.replace_rows("scores", {"crawl": "c", "scores_id": "s"}, again) == 5
    assert db.query("SELECT count(*) AS n FROM scores").column("n").to_pylist() == [5]


def test_two_processes_writing_at_once_lose_no_rows(tmp_path: Path) -> None:
    path = str(tmp_path / "l.duckdb")
    LineageDB(path)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_many, args=(path, c, 25)) for c in ("a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    counts = LineageDB(path).query(
        "SELECT crawl, count(*) n FROM artifacts GROUP BY 1 ORDER BY 1").to_pylist()
    assert counts == [{"crawl": "a", "n": 25}, {"crawl": "b", "n": 25}]


def _hold_write_lock(path: str, ready, release) -> None:
    import duckdb

    con = duckdb.connect(path)
    ready.set()
    release.wait(30)
    con.close()


def test_a_held_lock_is_logged_while_waiting_and_times_out_naming_the_file(
        tmp_path: Path, caplog) -> None:
    path = str(tmp_path / "l.duckdb")
    LineageDB(path)  # schema created before another process takes the lock
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_write_lock, args=(path, ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with caplog.at_level("WARNING", logger="dsdm.lineage"), \
                pytest.raises(TimeoutError, match=r"l.duckdb is still locked by another process "
                                                  r"after \d+ s \(lock_timeout_s 1.5\)"):
            LineageDB(path, lock_timeout_s=1.5).query("SELECT 1")
        assert "is locked by another process; waited 0 of 1.5 s" in caplog.text
    finally:
        release.set()
        holder.join(30)
    assert LineageDB(path).query("SELECT 1 AS one").to_pylist() == [{"one": 1}]


def test_a_file_from_before_selection_units_gains_the_column(tmp_path: Path) -> None:
    import duckdb

    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE selections (crawl VARCHAR NOT NULL, run_id VARCHAR, "
                    "selection_id VARCHAR NOT NULL, method VARCHAR NOT NULL, \"rank\" BIGINT NOT NULL, "
                    "example_id VARCHAR NOT NULL, doc_id VARCHAR NOT NULL, source VARCHAR, score DOUBLE)")
        con.execute("INSERT INTO selections VALUES ('c', 'r', 's', 'dsdm', 1, 'e', 'd', 'wiki', 0.5)")
    db = LineageDB(str(path))
    assert db.query("SELECT unit FROM selections").column("unit").to_pylist() == ["example"]
    rows = pa.table({"crawl": ["c"], "run_id": ["r2"], "selection_id": ["t"], "method": ["dsdm"],
                     "rank": [1], "example_id": ["e"], "doc_id": ["d"], "source": ["wiki"],
                     "score": [0.5], "unit": ["document"]})
    db.replace_rows("selections", {"crawl": "c", "selection_id": "t"}, rows)
    assert sorted(db.query("SELECT unit FROM selections").column("unit").to_pylist()) == [
        "document", "example"]


@pytest.mark.parametrize("mixing", ["sum", "max"])
def test_the_explanations_view_counts_parts_as_the_selection_mixed_them(
        tmp_path: Path, mixing: str) -> None:
    import numpy as np

    from dsdm.explain import mixing_coefficients
    from dsdm.selection import combine_task_scores

    rng = np.random.default_rng(0)
    tasks = {"qa": rng.normal(size=50), "code": rng.normal(size=50) * 3, "spam": rng.normal(size=50)}
    weights = {"qa": 2.0, "code": 1.0, "spam": -1.0}
    expected = combine_task_scores(tasks, weights, standardise=True, mixing=mixing)
    coefficients = mixing_coefficients(tasks, weights, standardise=True)
    db = LineageDB(str(tmp_path / "lineage.duckdb"))
    ids = [f"e{i:02d}" for i in range(50)]
    db.replace_rows("scores", {"crawl": "c"}, pa.table({
        "crawl": ["c"] * 150, "run_id": ["r"] * 150, "scores_id": ["s"] * 150,
        "example_id": ids * 3, "task": [t for t in tasks for _ in ids],
        "score": np.concatenate(list(tasks.values()))}))
    db.replace_rows("selection_weights", {"crawl": "c"}, pa.table({
        "crawl": ["c"] * 3, "run_id": ["r"] * 3, "selection_id": ["sel"] * 3,
        "scores_id": ["s"] * 3, "task": list(tasks), "weight": [0.5, 0.25, -0.25],
        "coefficient": [coefficients[t] for t in tasks], "mixing": [mixing] * 3}))
    mixed = db.query("SELECT example_id, sum(counted) AS score FROM explanations "
                     "GROUP BY example_id ORDER BY example_id")
    np.testing.assert_allclose(mixed.column("score").to_numpy(), expected, rtol=1e-12)


def test_a_file_from_before_max_mixing_gains_the_column(tmp_path: Path) -> None:
    import duckdb

    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE selection_weights (crawl VARCHAR NOT NULL, run_id VARCHAR, "
                    "selection_id VARCHAR NOT NULL, scores_id VARCHAR NOT NULL, "
                    "task VARCHAR NOT NULL, weight DOUBLE NOT NULL, coefficient DOUBLE NOT NULL)")
        con.execute("INSERT INTO selection_weights VALUES ('c', 'r', 'sel', 's', 'qa', 1.0, 2.0)")
    db = LineageDB(str(path))
    assert db.query("SELECT mixing FROM selection_weights").column("mixing").to_pylist() == ["sum"]
