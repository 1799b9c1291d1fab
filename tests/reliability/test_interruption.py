"""SIGKILL in the middle of proxy training and in the middle of featurisation, through the
real CLI: each re-run adopts the checkpoints and feature shards that were finished (the
lineage marks them), never reads a partial file as complete, and ends with the same scores
and selection as the uninterrupted run of tests/test_cli.py."""

import os
import signal
import subprocess
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
POLL_S = 0.02


def _kill_when(cli, log: Path, ready, what: str) -> float:
    """Start the job, SIGKILL its whole process group as soon as ``ready()`` holds; seconds run."""
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(cli.job(), env=cli.env, cwd=REPO, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while not ready():
                if process.poll() is not None:
                    pytest.fail(f"the job ended (rc={process.returncode}) before {what}:\n"
                                f"{log.read_text()[-3000:]}")
                if time.perf_counter() - start > 600:
                    pytest.fail(f"no {what} after 600 s")
                time.sleep(POLL_S)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL, f"the job was not killed mid-way: {what}"
    return time.perf_counter() - start


def _files(root: Path, pattern: str) -> list[Path]:
    return sorted(root.glob(pattern))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, make_cli):
    """Kill once while proxy 1 trains (proxy 0 done), once after two feature shards, then finish."""
    cli = make_cli(tmp_path_factory.mktemp("interrupted"))
    folder, store = cli.folder, cli.folder / "store"
    cli.run(cli.command("dsdm", "add-crawl", "small"))

    def proxy_0_done() -> bool:
        return bool(_files(store, "proxy_checkpoints/small/*/proxy-00/losses.json"))

    def two_shards_done() -> bool:
        return len(_files(store, "gradient_shards/small/*/proxy-*/shard-*.safetensors")) >= 2

    seconds = {"killed_in_training": _kill_when(cli, folder / "run1.log", proxy_0_done,
                                                "proxy 0's checkpoint")}
    after_first_kill = {
        "proxy_files": _files(store, "proxy_checkpoints/small/*/proxy-*/*"),
        "proxy_manifests": _files(store, "proxy_checkpoints/small/*/manifest.json"),
    }
    seconds["killed_in_featurisation"] = _kill_when(cli, folder / "run2.log", two_shards_done,
                                                    "two feature shards")
    after_second_kill = {
        "shards": {p.relative_to(store): p.read_bytes()
                   for p in _files(store, "gradient_shards/small/*/proxy-*/shard-*.safetensors")},
        "gradient_manifests": _files(store, "gradient_shards/small/*/manifest.json"),
    }
    start = time.perf_counter()
    cli.run(cli.job())
    seconds["resumed"] = time.perf_counter() - start
    return folder, after_first_kill, after_second_kill, seconds


def _db(folder: Path) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(str(folder / "lineage.duckdb"), read_only=True)


@pytest.mark.slow
def test_a_kill_leaves_no_manifest_for_unfinished_work(interrupted) -> None:
    _, after_first_kill, after_second_kill, _ = interrupted
    assert after_first_kill["proxy_manifests"] == []
    names = {p.parent.name for p in after_first_kill["proxy_files"] if p.name == "losses.json"}
    assert "proxy-00" in names and "proxy-01" not in names
    assert after_second_kill["gradient_manifests"] == []
    assert len(after_second_kill["shards"]) >= 2


@pytest.mark.slow
def test_finished_checkpoints_and_shards_are_adopted_and_the_lineage_says_so(interrupted) -> None:
    folder, _, after_second_kill, _ = interrupted
    con = _db(folder)
    adopted = con.execute("""
        SELECT asset, uri FROM artifacts
        WHERE json_extract_string(extra, '$.adopted') = 'true' AND NOT reused""").fetchall()
    adopted_proxy = [u for a, u in adopted if a == "proxy_checkpoints"]
    adopted_shards = [u for a, u in adopted if a == "gradient_shards"]
    # proxy 0 (4 files) came from the first killed run; the second run finished proxy 1
    assert len(adopted_proxy) == 4 and all("/proxy-00/" in u for u in adopted_proxy)
    assert sorted(Path(u).name for u in adopted_shards) == sorted(
        p.name for p in after_second_kill["shards"])
    # an adopted shard file is the very file the killed run wrote
    for relative, data in after_second_kill["shards"].items():
        assert (folder / "store" / relative).read_bytes() == data
    con.close()


@pytest.mark.slow
def test_no_partial_file_is_part_of_any_manifest(interrupted) -> None:
    folder, *_ = interrupted
    con = _db(folder)
    uris = [u for (u,) in con.execute("SELECT uri FROM artifacts").fetchall()]
    assert uris and not [u for u in uris if ".part-" in u]
    for uri in uris:  # every recorded artifact exists with its recorded size
        path = Path(uri.removeprefix("file://"))
        size = con.execute("SELECT size_bytes FROM artifacts WHERE uri = ? LIMIT 1", [uri]).fetchone()[0]
        assert path.stat().st_size == size, uri
    con.close()


@pytest.mark.slow
def test_scores_and_selection_equal_the_uninterrupted_run(interrupted, cli_selection_run) -> None:
    folder, *_, seconds = interrupted
    reference = cli_selection_run.folder

    def scores(root: Path):
        (path,) = _files(root / "store", "datamodel_weights/small/*/scores.parquet")
        return pq.read_table(path)

    def selection(root: Path):
        (path,) = _files(root / "store", "selected_subset/small/*/manifest.parquet")
        return pq.read_table(path)

    assert scores(folder).equals(scores(reference))
    assert selection(folder).equals(selection(reference))
    print(f"interruption timings (s): {seconds}")
