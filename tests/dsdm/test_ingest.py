"""Ingest: validation reasons, normalisation, content ids, dedup, reconciliation."""

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dsdm.ingest import (
    CrawlError,
    IngestConfig,
    doc_id_of,
    ingest_crawl,
    list_shards,
    normalise_text,
)


def _write_jsonl_gz(path: Path, lines: list[bytes]) -> None:
    with gzip.open(path, "wb") as handle:
        for line in lines:
            handle.write(line + b"\n")


def _line(record: dict) -> bytes:
    return json.dumps(record).encode()


@pytest.fixture
def dirty_crawl(tmp_path: Path, demo_rows: list[dict]) -> Path:
    """Real demo documents with one planted instance of each failure, in two formats."""
    seen, real = set(), []
    for row in demo_rows:  # distinct, valid real rows, so only the planted ones are rejected
        key = doc_id_of(normalise_text(row["text"]))
        if len(normalise_text(row["text"])) >= 20 and key not in seen:
            seen.add(key)
            real.append(row)
        if len(real) == 40:
            break
    crawl = tmp_path / "dirty"
    crawl.mkdir()
    lines = [_line(r) for r in real[:30]]
    lines += [
        b"{not json",                                                     # 30 malformed_json
        _line({"id": "no-text", "source": "x"}),                          # 31 missing_text
        _line({"id": "int-text", "text": 42}),                            # 32 wrong_type
        _line({"id": "empty", "text": " \n\t "}),                         # 33 empty_text
        _line({"id": "short", "text": "too short"}),                      # 34 too_short
        _line({"id": "nul", "text": real[0]["text"][:100] + "\x00x"}),    # 35 nul_bytes
        "{\"id\": \"latin1\", \"text\": \"caf\xe9 au lait ".encode("latin-1") + b'is nice"}',  # 36
        _line(real[3]),                                                   # 37 duplicate
        _line({**real[4], "text": "  " + real[4]["text"].replace(" ", "   ") + "\n\n\n"}),  # 38 dup
        b"[1, 2, 3]",                                                     # 39 not_an_object
        b"",                                                              # 40 empty_line
    ]
    _write_jsonl_gz(crawl / "part-0.jsonl.gz", lines)
    table = pa.table({
        "id": [r["id"] for r in real[30:]], "text": [r["text"] for r in real[30:]],
        "source": [r["source"] for r in real[30:]],
    })
    pq.write_table(table, crawl / "part-1.parquet")
    (crawl / "_SUCCESS").write_text("")
    return crawl


def test_every_row_is_accounted_for_with_a_reason(dirty_crawl: Path) -> None:
    result = ingest_crawl(str(dirty_crawl), IngestConfig(min_chars=20))
    reasons = {(row["row"], row["reason"]) for row in result.quarantine.to_dicts()}
    assert reasons == {
        (30, "malformed_json"), (31, "missing_text"), (32, "wrong_type"), (33, "empty_text"),
        (34, "too_short"), (35, "nul_bytes"), (36, "invalid_utf8"), (37, "duplicate"),
        (38, "duplicate"), (39, "not_an_object"), (40, "empty_line"),
    }
    assert result.rows_read == 41 + 10
    assert result.documents.height == 40
    assert result.duplicates == 2 and result.quarantined == 9
    assert result.reconciles()
    assert all(f.endswith(("part-0.jsonl.gz", "part-1.parquet")) for f in result.documents["file"])


def test_whitespace_variant_is_a_duplicate_of_the_original(dirty_crawl: Path) -> None:
    result = ingest_crawl(str(dirty_crawl))
    dup = result.quarantine.filter(result.quarantine["row"] == 38).to_dicts()[0]
    original = result.documents.filter(result.documents["row"] == 4).to_dicts()[0]
    assert dup["detail"].startswith(original["doc_id"])


def test_doc_id_is_the_hash_of_normalised_text(demo_rows: list[dict]) -> None:
    text = demo_rows[0]["text"]
    assert doc_id_of(normalise_text(text)) == doc_id_of(normalise_text("  " + text + "\r\n\r\n"))
    assert doc_id_of(normalise_text(text)) != doc_id_of(normalise_text(demo_rows[1]["text"]))


def test_normalise_keeps_paragraphs_and_collapses_spaces() -> None:
    assert normalise_text("a  \t b\r\n\r\n\r\n\r\nc \n d") == "a b\n\nc\nd"


def test_truncated_gzip_keeps_rows_read_and_quarantines_the_tail(
    tmp_path: Path, demo_rows: list[dict]
) -> None:
    crawl = tmp_path / "trunc"
    crawl.mkdir()
    full = tmp_path / "full.jsonl.gz"
    _write_jsonl_gz(full, [_line(r) for r in demo_rows[:200]])
    data = full.read_bytes()
    (crawl / "part-0.jsonl.gz").write_bytes(data[: len(data) // 2])
    result = ingest_crawl(str(crawl))
    tail = result.quarantine.filter(result.quarantine["reason"] == "unreadable_file")
    assert tail.height == 1
    assert 0 < result.documents.height < 200
    assert result.reconciles()


def test_parquet_without_text_column_is_quarantined_as_a_whole(tmp_path: Path) -> None:
    crawl = tmp_path / "schema"
    crawl.mkdir()
    pq.write_table(pa.table({"body": ["some text that is long enough"]}), crawl / "a.parquet")
    result = ingest_crawl(str(crawl))
    (row,) = result.quarantine.to_dicts()
    assert row["reason"] == "schema_mismatch" and row["row"] is None and "body" in row["detail"]
    assert result.reconciles()


def test_missing_or_empty_crawl_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(CrawlError, match="not found"):
        list_shards(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "_SUCCESS").write_text("")
    with pytest.raises(CrawlError, match="no shards"):
        list_shards(str(tmp_path / "empty"))


def test_config_rejects_impossible_bounds() -> None:
    with pytest.raises(ValueError, match="exceeds max_chars"):
        IngestConfig(min_chars=100, max_chars=10)
    with pytest.raises(ValueError):
        IngestConfig(unknown_key=1)
