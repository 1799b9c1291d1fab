"""Whole-pipeline scale: documents -> selected_subset on growing slices of the bench crawl.

    python bench/scale.py                            # 8k, 32k, 128k examples (~30 min, 2 cores)
    python bench/scale.py --examples 2000 8000 --name quick

Each slice takes every k-th document of the bench crawl (`make bench-corpus`; all ten
sources), written as part files of 2,000 documents as a crawler writes them. Every asset on
the selection path is then materialised in a process of its own (in-process executor; the
Dagster instance, store and DuckDB file of a slice are shared by its steps), so this process
reads each step's own wall time, CPU time and peak RSS (``wait4``). Per step it also records
the bytes the step added to the store, the DuckDB rows it added per table and the time spent
in DuckDB writes. A no-op step (imports, instance, resources, nothing materialised) gives the
baseline: ``*_above_baseline`` (wall, CPU, RSS) is what a step's own work costs.

The proxies are tiny (hidden 32, one layer, at most 100 training steps: flat in N from ~7k
examples) and the projection small (d = 512), so the costs that grow with the pool show, not
model compute. Writes
``bench/out/scale-<name>.json`` and prints it: per slice and step the measurements, and per
step the fitted exponent b of ``cost ~ N^b`` over the slices (least squares in log-log) for
wall time, CPU time and RSS above the baseline. Linear growth is b = 1, flat memory b = 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import subset_crawl  # noqa: E402

OUT = REPO / "bench" / "out"
BENCH_CRAWL = REPO / ".dsdm" / "bench" / "crawls" / "bench"
BENCH_TASKS = REPO / ".dsdm" / "bench" / "tasks"
EXAMPLES_PER_DOCUMENT = 4.3  # 128-token windows per bench document (vocabulary 4,096)
DOCS_PER_PART = 2000
STEPS = ("documents", "tokenizer", "tokenized_corpus", "target_tasks", "proxy_checkpoints",
         "gradient_shards", "target_gradients", "datamodel_weights", "selected_subset")
BASELINE = "baseline"
ABOVE_BASELINE = {"wall_s": "wall_above_baseline_s", "cpu_s": "cpu_above_baseline_s",
                  "peak_rss_mb": "rss_above_baseline_mb"}

RUN_CONFIG = {
    "tokenizer": {"vocab_size": 4096},
    "tokenized_corpus": {"seq_len": 128, "shard_size": 4096},
    "target_tasks": {"tasks": ["wiki_qa", "lambada_cloze", "tech_faq"]},
    "proxy_checkpoints": {"num_proxies": 2, "train_fraction": 0.5, "model": {
        "hidden_size": 32, "num_layers": 1, "num_heads": 2, "epochs": 1, "max_steps": 100,
        "batch_size": 32}},
    "gradient_shards": {"target_dim": 512, "batch_size": 64},
    "target_gradients": {"batch_size": 64},
    "datamodel_weights": {"lambda_relative": 0.1, "explain_targets": 3},
    "selected_subset": {"fraction": 0.2},
}


# --- one step, in its own process ------------------------------------------------------------

def run_step(step: str, folder: Path, crawl: str, tasks: Path, threads: int) -> None:
    """Materialise ``step`` for ``crawl`` (its upstream already there) and write the DuckDB
    write count and time to ``folder/steps/<step>.json``. ``baseline`` materialises nothing."""
    import dagster as dg

    from dsdm.lineage import LineageDB
    from dsdm_assets.definitions import ASSETS
    from dsdm_assets.partitions import crawl_partitions
    from resources import (
        ArtifactStoreResource,
        ComputeResource,
        CrawlSourceResource,
        LineageResource,
    )

    writes = {"count": 0, "seconds": 0.0}

    def timed(method):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                writes["count"] += 1
                writes["seconds"] += time.perf_counter() - start
        return wrapper

    LineageDB.replace_rows = timed(LineageDB.replace_rows)
    LineageDB.record_artifacts = timed(LineageDB.record_artifacts)

    resources = {
        "store": ArtifactStoreResource(root_url=str(folder / "store")),
        "crawls": CrawlSourceResource(root_url=str(folder / "crawls"), tasks_url=str(tasks)),
        "lineage": LineageResource(database=str(folder / "lineage.duckdb")),
        "compute": ComputeResource(device="cpu", threads=threads),
    }
    with dg.DagsterInstance.from_config(str(folder / "dagster_home")) as instance:
        if crawl not in instance.get_dynamic_partitions(crawl_partitions.name):
            instance.add_dynamic_partitions(crawl_partitions.name, [crawl])
        if step != BASELINE:
            config = {"ops": {step: {"config": RUN_CONFIG[step]}}} if step in RUN_CONFIG else {}
            result = dg.materialize(ASSETS, selection=[step], partition_key=crawl,
                                    instance=instance, resources=resources, run_config=config)
            if not result.success:
                raise SystemExit(f"{step} failed on {crawl}")
    (folder / "steps").mkdir(exist_ok=True)
    (folder / "steps" / f"{step}.json").write_text(json.dumps(writes))


# --- the driver -----------------------------------------------------------------------------

def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _table_rows(database: Path) -> dict[str, int]:
    if not database.exists():
        return {}
    import duckdb

    with duckdb.connect(str(database), read_only=True) as con:
        tables = [r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE'"
        ).fetchall()]
        return {t: con.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}


def measure_step(step: str, folder: Path, crawl: str, args: argparse.Namespace) -> dict:
    """Run one step in a child process and read its own resource usage."""
    rows_before = _table_rows(folder / "lineage.duckdb")
    store_before = _folder_bytes(folder / "store")
    command = [sys.executable, __file__, "--step", step, "--folder", str(folder),
               "--crawl-name", crawl, "--tasks", str(args.tasks), "--threads", str(args.threads)]
    log = folder / "logs" / f"{step}.log"  # a file, not a pipe: a full pipe stalls the step
    log.parent.mkdir(exist_ok=True)
    start = time.perf_counter()
    with log.open("wb") as sink:
        child = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise SystemExit(f"step {step} on {crawl} failed (log: {log}):\n{tail}")
    writes = json.loads((folder / "steps" / f"{step}.json").read_text())
    rows_after = _table_rows(folder / "lineage.duckdb")
    added = {t: n - rows_before.get(t, 0) for t, n in rows_after.items()
             if n != rows_before.get(t, 0)}
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "store_bytes": _folder_bytes(folder / "store") - store_before,
            "duckdb_rows": added, "duckdb_writes": writes["count"],
            "duckdb_write_s": round(writes["seconds"], 3)}


def pool_counts(folder: Path, crawl: str) -> dict:
    import duckdb

    with duckdb.connect(str(folder / "lineage.duckdb"), read_only=True) as con:
        (examples,) = con.execute("SELECT count(*) FROM scores WHERE crawl = ? AND task = ?",
                                  [crawl, RUN_CONFIG["target_tasks"]["tasks"][0]]).fetchone()
    return {"examples": int(examples)}


def run_slice(examples: int, args: argparse.Namespace) -> dict:
    crawl = f"n{examples}"
    folder = OUT / "scale" / args.name / crawl
    docs = math.ceil(examples / EXAMPLES_PER_DOCUMENT)
    if not (folder / "crawls" / crawl / "_SUCCESS").exists():
        subset_crawl(args.crawl, docs, folder / "crawls" / crawl, docs_per_part=DOCS_PER_PART)
    for stale in ("store", "lineage.duckdb", "dagster_home", "steps", "logs"):
        # an earlier run's artifacts would be reused, and reuse measures nothing
        path = folder / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    home = folder / "dagster_home"
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    steps = {}
    for step in (BASELINE, *STEPS):
        steps[step] = measure_step(step, folder, crawl, args)
        print(f"[scale] {crawl} {step}: {steps[step]['wall_s']} s, "
              f"{steps[step]['peak_rss_mb']} MB", file=sys.stderr, flush=True)
    baseline = steps[BASELINE]
    for measured in steps.values():
        for metric, above in ABOVE_BASELINE.items():
            measured[above] = round(measured[metric] - baseline[metric], 2)
    return {"target_examples": examples, "documents": docs, **pool_counts(folder, crawl),
            "steps": steps}


def exponent(sizes: list[float], values: list[float]) -> float | None:
    """Least-squares slope of log(value) on log(size); None where a value is not positive."""
    if len(sizes) < 2 or min(values) <= 0:
        return None
    xs, ys = [math.log(s) for s in sizes], [math.log(v) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
                 / sum((x - mx) ** 2 for x in xs), 2)


def growth(slices: list[dict]) -> dict:
    sizes = [s["examples"] for s in slices]
    fitted = {}
    for step in STEPS:
        fitted[step] = {metric: exponent(sizes, [s["steps"][step][metric] for s in slices])
                        for metric in ("wall_above_baseline_s", "cpu_above_baseline_s",
                                       "rss_above_baseline_mb", "store_bytes", "duckdb_write_s")}
    return fitted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, nargs="+", default=[8000, 32000, 128000],
                        help="pool sizes in 128-token examples (approximate: whole documents)")
    parser.add_argument("--name", default="standard", help="output name")
    parser.add_argument("--crawl", type=Path, default=BENCH_CRAWL)
    parser.add_argument("--tasks", type=Path, default=BENCH_TASKS)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # the child process's mode
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--crawl-name", dest="crawl_name", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        run_step(args.step, args.folder, args.crawl_name, args.tasks, args.threads)
        return
    started = time.perf_counter()
    slices = [run_slice(n, args) for n in sorted(args.examples)]
    result = {"bench": "scale", "name": args.name, "slices": slices, "growth": growth(slices),
              "run_config": RUN_CONFIG, "threads": args.threads, "cpus": os.cpu_count(),
              "wall_s": round(time.perf_counter() - started, 1)}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"scale-{args.name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
