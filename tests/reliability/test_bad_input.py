"""The bad-input matrix: every kind of broken crawl file, on real text, ends in a clear
quarantine reason (or error) and the counts reconcile: rows read = accepted + rejected."""

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsdm.ingest import IngestConfig, doc_id_of, ingest_crawl, normalise_text


def _crawl(tmp_path: Path, files: dict[str, bytes]) -> Path:
    crawl = tmp_path / "crawl"
    crawl.mkdir(exist_ok=True)
    for name, data in files.items():
        (crawl / name).write_bytes(data)
    return crawl


def _jsonl(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def _reasons(result) -> list[tuple[str, int | None, str]]:
    return [(Path(r["file"]).name, r["row"], r["reason"]) for r in result.quarantine.to_dicts()]


def test_empty_files_are_reported_not_skipped(tmp_path, demo_rows) -> None:
    crawl = _crawl(tmp_path, {
        "a.jsonl": b"", "b.jsonl.gz": gzip.compress(b""),
        "c.parquet": b"", "d.jsonl": _jsonl(demo_rows[:3]),
    })
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), crawl / "c.parquet")
    result = ingest_crawl(str(crawl))
    assert sorted(_reasons(result)) == [("a.jsonl", None, "empty_file"),
                                        ("b.jsonl.gz", None, "empty_file"),
                                        ("c.parquet", None, "empty_file")]
    assert result.documents.height == 3 and result.reconciles()


def test_a_document_over_max_chars_is_quarantined_as_too_long(tmp_path, demo_rows) -> None:
    text = demo_rows[0]["text"]
    for size, reason, detail in ((2_000_000, "too_long", "max_chars 1000000"),
                                 (50_000_000, "line_too_long", "(12 x max_chars + 64 KiB)")):
        huge = (text + "\n\n") * (size // (len(text) + 2) + 1)
        (tmp_path / str(size)).mkdir()
        crawl = _crawl(tmp_path / str(size), {"big.jsonl": _jsonl([{"id": "big", "text": huge},
                                                                    demo_rows[1]])})
        result = ingest_crawl(str(crawl))
        (row,) = result.quarantine.to_dicts()
        assert row["reason"] == reason and row["row"] == 0
        assert detail in row["detail"] and len(row["excerpt"]) <= 200
        assert result.documents.height == 1 and result.reconciles()


def test_byte_order_mark_and_mixed_encodings(tmp_path, demo_rows) -> None:
    latin1 = '{"id": "l1", "text": "Caf\xe9 cr\xe8me in a latin-1 line of text"}'.encode("latin-1")
    data = b"\xef\xbb\xbf" + _jsonl(demo_rows[:2]) + latin1 + b"\n" + _jsonl(demo_rows[2:4])
    result = ingest_crawl(str(_crawl(tmp_path, {"mixed.jsonl": data})))
    assert _reasons(result) == [("mixed.jsonl", 2, "invalid_utf8")]
    assert result.documents.height == 4 and result.reconciles()


def test_lone_surrogate_in_json_escape_is_invalid_utf8(tmp_path, demo_rows) -> None:
    line = b'{"id": "s", "text": "broken \\ud800 surrogate in an otherwise fine sentence"}\n'
    result = ingest_crawl(str(_crawl(tmp_path, {"s.jsonl": line + _jsonl(demo_rows[:1])})))
    assert _reasons(result) == [("s.jsonl", 0, "invalid_utf8")]


def test_parquet_with_wrong_text_type_is_quarantined_per_row(tmp_path, demo_rows) -> None:
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    pq.write_table(pa.table({"text": [1, 2, 3]}), crawl / "ints.parquet")
    pq.write_table(pa.table({"text": [r["text"] for r in demo_rows[:2]], "source": ["x", "y"]}),
                   crawl / "ok.parquet")
    result = ingest_crawl(str(crawl))
    assert [r[2] for r in _reasons(result)] == ["wrong_type"] * 3
    assert result.documents.height == 2 and result.reconciles()


# Property-based: the reader and the normaliser on arbitrary text.

texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)


@given(texts)
def test_normalise_is_idempotent_and_tidy(text: str) -> None:
    once = normalise_text(text)
    assert normalise_text(once) == once
    assert once == once.strip()
    assert "\n\n\n" not in once and "  " not in once and "\t" not in once


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(texts, st.just("same text repeated, long enough"), st.none(),
                          st.integers()), max_size=30))
def test_reader_accounts_for_every_row(tmp_path_factory, values: list) -> None:
    crawl = tmp_path_factory.mktemp("prop")
    rows = [{"id": str(i), "text": v} for i, v in enumerate(values)]
    (crawl / "p.jsonl").write_bytes(_jsonl(rows))
    result = ingest_crawl(str(crawl), IngestConfig(min_chars=5))
    assert result.reconciles()
    valid = [normalise_text(v) for v in values
             if isinstance(v, str) and "\x00" not in v and len(normalise_text(v)) >= 5]
    assert result.documents.height == len(set(valid))
    assert result.duplicates == len(valid) - len(set(valid))
    for doc in result.documents.to_dicts():
        assert doc["doc_id"] == doc_id_of(doc["text"])
    if not values:
        assert _reasons(result) == [("p.jsonl", None, "empty_file")]


def test_impossible_config_values_name_the_field() -> None:
    with pytest.raises(ValueError, match="min_chars"):
        IngestConfig(min_chars=0)
    with pytest.raises(ValueError, match="extra"):
        IngestConfig(text_feild="body")


def test_a_document_of_zero_width_characters_is_empty_text(tmp_path, demo_rows) -> None:
    invisible = {"id": "zw", "text": "\u200b\u200c\u200d\ufeff\u2060 " * 40}
    crawl = _crawl(tmp_path, {"zw.jsonl": _jsonl([demo_rows[0], invisible, demo_rows[1]])})
    result = ingest_crawl(str(crawl))
    assert _reasons(result) == [("zw.jsonl", 1, "empty_text")]
    assert "no visible characters" in result.quarantine["detail"][0]
    assert result.documents.height == 2 and result.reconciles()


@pytest.mark.parametrize(("field", "value", "detail"), [
    ("source", "wiki\ud800pedia", "'source' has a lone surrogate"),
    ("id", "\udfff", "'id' has a lone surrogate"),
    ("url", "https://example.org/\ud800", "'url' has a lone surrogate"),
    ("source", "s" * 5_000_000, "'source' is 5000000 chars > 256"),
    ("url", "https://example.org/" + "a" * 5000, "'url' is 5020 chars > 4096"),
])
def test_a_bad_metadata_field_quarantines_its_row(tmp_path, demo_rows, field, value, detail) -> None:
    bad = {**demo_rows[2], field: value}
    # json.dumps writes a lone surrogate as the escape \\udXXX, which json.loads accepts
    crawl = _crawl(tmp_path, {"f.jsonl": _jsonl([demo_rows[0], bad, demo_rows[1]])})
    result = ingest_crawl(str(crawl))
    assert _reasons(result) == [("f.jsonl", 1, "bad_field")]
    assert result.quarantine["detail"][0].startswith(detail)
    assert len(result.quarantine["excerpt"][0]) <= 200
    assert result.documents.height == 2 and result.reconciles()
    result.documents.write_parquet(tmp_path / "docs.parquet")  # every stored string encodes
    result.quarantine.write_parquet(tmp_path / "quarantine.parquet")


def test_a_200_mb_line_and_a_gzip_bomb_are_quarantined_as_they_stream(tmp_path, demo_rows) -> None:
    import subprocess
    import sys

    long_line = b'{"id": "long", "text": "' + b"word " * 40_000_000 + b'"}\n'  # 200 MB
    crawl = _crawl(tmp_path, {"long.jsonl": _jsonl(demo_rows[:2]) + long_line
                              + _jsonl(demo_rows[2:4])})
    del long_line
    # 512 MiB of one JSON string in about 0.5 MB of gzip
    bomb = gzip.compress(b'{"id": "bomb", "text": "' + b"a" * (1 << 29) + b'"}\n', 1)
    (crawl / "bomb.jsonl.gz").write_bytes(bomb + gzip.compress(_jsonl(demo_rows[4:5])))
    # In a child process, so that its peak RSS is the ingest's own: VmHWM starts afresh at
    # exec (ru_maxrss would carry over the forking test process's).
    script = ("import json, sys; from dsdm.ingest import ingest_crawl; "
              "r = ingest_crawl(sys.argv[1]); "
              "print(json.dumps({'reasons': [(x['file'].rsplit('/', 1)[-1], x['row'], x['reason'],"
              " x['detail']) for x in r.quarantine.to_dicts()], 'docs': r.documents.height, "
              "'ok': r.reconciles(), 'rss_mb': int([x for x in open('/proc/self/status') "
              "if x.startswith('VmHWM')][0].split()[1]) / 1024}))")
    out = json.loads(subprocess.run([sys.executable, "-c", script, str(crawl)], check=True,
                                    capture_output=True, text=True).stdout)
    assert [r[:3] for r in out["reasons"]] == [["bomb.jsonl.gz", 0, "line_too_long"],
                                               ["long.jsonl", 2, "line_too_long"]]
    assert "bytes > 12065536" in out["reasons"][0][3]
    assert out["docs"] == 5 and out["ok"]
    assert out["rss_mb"] < 300, out  # ~120 MB (imports ~100); a whole 200 MB line took 2.2 GB


def test_links_out_of_the_crawl_and_special_files_are_refused(tmp_path, demo_rows) -> None:
    import os

    secret = tmp_path / "elsewhere" / "secret.jsonl"
    secret.parent.mkdir()
    secret.write_bytes(_jsonl([{"id": "s", "text": "a private line that must not be read " * 3}]))
    crawl = _crawl(tmp_path, {"good.jsonl": _jsonl(demo_rows[:3])})
    (crawl / "outside.jsonl").symlink_to(secret)
    (crawl / "zero.jsonl").symlink_to("/dev/zero")
    os.mkfifo(crawl / "pipe.jsonl")
    (crawl / "inside.jsonl").symlink_to(crawl / "good.jsonl")  # a link within the folder is read
    result = ingest_crawl(str(crawl))
    reasons = {name: (reason, detail) for (name, _, reason), detail in
               zip(_reasons(result), result.quarantine["detail"], strict=True)}
    assert reasons["outside.jsonl"][0] == "refused_file" and "outside the crawl" in reasons["outside.jsonl"][1]
    assert reasons["zero.jsonl"][0] == "refused_file"
    assert reasons["pipe.jsonl"] == ("refused_file", "not a regular file (a device, FIFO or socket)")
    assert "private" not in " ".join(result.quarantine["excerpt"].fill_null("").to_list())
    assert result.reconciles() and result.documents.height == 3  # inside.jsonl: 3 duplicates
