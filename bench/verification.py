"""What verifying stored artifacts costs: sha256 of every file a manifest lists, streamed, as
a reuse check or an upstream read does (`dsdm_assets.recording.verify_files`).

    .venv/bin/python -m bench.verification                         # the demo store (make demo)
    .venv/bin/python -m bench.verification --store bench/out/selection_quality/bench-5200/store

For every asset folder of the store (the newest manifest per asset and crawl) it times
`verify_files` and, as the reference in the same run, a plain streamed read of the same
bytes; it prints one JSON object: per asset the files, bytes, seconds and the ratio of
verifying to reading, and the totals. The page cache is warm for the second pass of a file,
so each asset is read first and hashed second: the ratio is the cost of hashing over I/O.
"""

import argparse
import json
import time
from pathlib import Path

from dsdm.store import ArtifactStore
from dsdm_assets.recording import verify_files


def newest_manifests(root: Path) -> dict[str, Path]:
    """``<asset>/<crawl>`` -> its most recently written manifest.json."""
    newest: dict[str, Path] = {}
    for path in root.glob("*/*/*/manifest.json"):
        key = "/".join(path.relative_to(root).parts[:2])
        if key not in newest or path.stat().st_mtime > newest[key].stat().st_mtime:
            newest[key] = path
    return newest


def plain_read_seconds(store: ArtifactStore, paths: list[str], chunk_bytes: int = 1 << 22) -> float:
    start = time.perf_counter()
    for path in paths:
        with store.fs.open(store.path(path), "rb") as handle:
            while handle.read(chunk_bytes):
                pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=".dsdm/store", help="artifact store root (a folder)")
    args = parser.parse_args()
    root = Path(args.store)
    store = ArtifactStore(str(root))
    assets, totals = {}, {"files": 0, "bytes": 0, "read_s": 0.0, "verify_s": 0.0}
    for key, path in sorted(newest_manifests(root).items()):
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        read_s = plain_read_seconds(store, [f["path"] for f in files])
        start = time.perf_counter()
        changed = verify_files(store, manifest)
        verify_s = time.perf_counter() - start
        size = sum(f["size_bytes"] for f in files)
        assets[key] = {"files": len(files), "bytes": size, "read_s": round(read_s, 3),
                       "verify_s": round(verify_s, 3), "changed": len(changed),
                       "verify_over_read": round(verify_s / read_s, 2) if read_s > 0 else None}
        for name, value in (("files", len(files)), ("bytes", size), ("read_s", read_s),
                            ("verify_s", verify_s)):
            totals[name] += value
    totals["verify_gb_per_s"] = round(totals["bytes"] / 1e9 / max(totals["verify_s"], 1e-9), 3)
    totals["verify_over_read"] = round(totals["verify_s"] / max(totals["read_s"], 1e-9), 2)
    totals["read_s"], totals["verify_s"] = round(totals["read_s"], 2), round(totals["verify_s"], 2)
    print(json.dumps({"store": str(root), "assets": assets, "total": totals}, indent=1))


if __name__ == "__main__":
    main()
