"""The bench's crawl subset keeps its bytes across re-runs, so a re-run reuses every asset."""

import gzip
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_CRAWL = REPO / "data" / "crawls" / "demo"
sys.path.insert(0, str(REPO))  # bench/ is not part of the installed package
from bench.common import subset_crawl  # noqa: E402


def test_subset_crawl_leaves_a_matching_part_file_as_it_is(tmp_path: Path):
    folder = subset_crawl(DEMO_CRAWL, 40, tmp_path / "crawl")
    part = folder / "part-00000.jsonl.gz"
    rows = gzip.decompress(part.read_bytes()).decode().splitlines()
    assert len(rows) == 40
    # a file written by another writer (gzip stamps its own time): same documents, other bytes
    part.write_bytes(gzip.compress("\n".join(rows).encode() + b"\n", mtime=12345))
    before = part.read_bytes()
    os.utime(part, (0, 0))
    subset_crawl(DEMO_CRAWL, 40, folder)
    assert part.read_bytes() == before and part.stat().st_mtime == 0

    # other documents are rewritten, and a fresh folder gets the same bytes every time
    subset_crawl(DEMO_CRAWL, 30, folder)
    assert len(gzip.decompress(part.read_bytes()).decode().splitlines()) == 30
    again = subset_crawl(DEMO_CRAWL, 30, tmp_path / "again") / "part-00000.jsonl.gz"
    assert again.read_bytes() == part.read_bytes()
