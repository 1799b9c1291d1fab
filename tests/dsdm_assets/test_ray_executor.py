"""DSDM_EXECUTOR=ray on a real local Ray cluster: a head on 127.0.0.1 with no CPUs and two
one-CPU worker nodes, started and stopped here. Featurisation of the small crawl runs as one
Ray job per (proxy, shard) step; one step's process is killed mid-run. The feature files
must equal an in-process run's byte for byte, every step must have run on a worker node,
and the killed step must have been retried, not lost or half-written.

The run is launched as a user launches it (`dagster asset materialize` with the variables
set), because the code location reads DSDM_EXECUTOR and the per-step Ray requests when it
loads. One torch thread per step: bit-for-bit equality needs equal thread counts."""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import dagster as dg
import pytest

ray = pytest.importorskip("ray", reason="the Ray test needs pip install -e '.[test]'")
from ray.job_submission import JobSubmissionClient  # noqa: E402

UPSTREAM = "documents,tokenizer,tokenized_corpus,target_tasks,proxy_checkpoints"
FEATURISE = "gradient_shards.featurise_gradient_shard["
WORKERS = 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalRayCluster:
    """`ray start` processes: a head node with no CPUs (so no step can run there) and
    `WORKERS` one-CPU worker nodes, in a short temp folder (Ray's socket paths are bounded)."""

    def __init__(self, ray_bin: Path) -> None:
        self.ray_bin = str(ray_bin)
        self.temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        self.gcs = f"127.0.0.1:{_free_port()}"
        self.dashboard = f"http://127.0.0.1:{_free_port()}"
        # Every node runs with the project's environment, as a cluster image would: the
        # executor's step command is this environment's `dagster`.
        path = f"{Path(ray_bin).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        self.env = {**os.environ, "PATH": path, "RAY_USAGE_STATS_ENABLED": "0"}

    def _start(self, *args: str) -> None:
        subprocess.run([self.ray_bin, "start", "--node-ip-address=127.0.0.1",
                        "--disable-usage-stats", *args], env=self.env, check=True,
                       capture_output=True, timeout=120)

    def __enter__(self) -> "LocalRayCluster":
        try:
            return self._start_nodes()
        except BaseException:
            self.__exit__()
            raise

    def _start_nodes(self) -> "LocalRayCluster":
        self._start("--head", f"--port={self.gcs.split(':')[1]}", "--num-cpus=0",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dashboard.rsplit(':', 1)[1]}",
                    f"--temp-dir={self.temp}")
        for _ in range(WORKERS):
            self._start(f"--address={self.gcs}", "--num-cpus=1")
        self.client = JobSubmissionClient(self.dashboard)
        self.head_node = self._node_ids(head=True)
        deadline = time.monotonic() + 60
        while len(self._node_ids(head=False)) < WORKERS:
            assert time.monotonic() < deadline, "Ray worker nodes did not join"
            time.sleep(0.5)
        return self

    def _node_ids(self, head: bool) -> set[str]:
        from ray.util.state import list_nodes

        nodes = list_nodes(address=self.gcs, filters=[("state", "=", "ALIVE")])
        return {n.node_id for n in nodes if n.is_head_node == head}

    def workers(self) -> set[str]:
        return self._node_ids(head=False)

    def __exit__(self, *_) -> None:
        # `ray stop` ends every Ray process of this user on the machine; none other is
        # expected where the tests run.
        subprocess.run([self.ray_bin, "stop", "--force"], env=self.env, capture_output=True,
                       timeout=120)
        shutil.rmtree(self.temp, ignore_errors=True)


def _kill_first_featurise_step(instance_dir: Path, killed: dict, stop: threading.Event) -> None:
    """Once a featurisation step of a new run has started (its STEP_START event names its
    process), kill that process with SIGKILL, as a lost worker would end it."""
    with dg.DagsterInstance.from_config(str(instance_dir)) as instance:
        earlier = {run.run_id for run in instance.get_runs()}
        while not stop.is_set():
            for run in instance.get_runs():
                if run.run_id in earlier:
                    continue
                records = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START)
                started = [e for e in records if e.step_key.startswith(FEATURISE)]
                if started:
                    event = started[0]
                    os.kill(event.dagster_event.pid, signal.SIGKILL)
                    killed.update(step=event.step_key, pid=event.dagster_event.pid,
                                  run_id=run.run_id)
                    return
            time.sleep(0.05)


def _files(folder: Path) -> dict[str, bytes]:
    (made,) = [p for p in folder.iterdir() if p.is_dir()]
    return {str(p.relative_to(made)): p.read_bytes()
            for p in sorted(made.rglob("*")) if p.is_file() and p.name != "manifest.json"}


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, make_cli):
    cli = make_cli(tmp_path_factory.mktemp("ray"))
    cli.env["DSDM_THREADS"] = "1"
    cli.run(cli.command("dsdm", "add-crawl", "small"))
    materialize = cli.command("dagster", "asset", "materialize", "-m", "dsdm_assets.definitions",
                              "--partition", "small", "-c", str(cli.run_config), "--select")
    cli.run([*materialize, UPSTREAM])
    started = time.monotonic()
    cli.run([*materialize, "gradient_shards"])
    in_process_seconds = time.monotonic() - started
    store = cli.folder / "store"
    reference = cli.folder / "in_process"
    shutil.move(store / "gradient_shards", reference)  # the Ray run must recompute every file

    with LocalRayCluster(Path(cli.command("ray")[0])) as cluster:
        env = {**cli.env, "DSDM_EXECUTOR": "ray", "DSDM_RAY_ADDRESS": cluster.gcs}
        killed: dict = {}
        stop = threading.Event()
        killer = threading.Thread(target=_kill_first_featurise_step,
                                  args=(Path(env["DAGSTER_HOME"]), killed, stop), daemon=True)
        killer.start()
        started = time.monotonic()
        result = subprocess.run([*materialize, "gradient_shards"], env=env, cwd=cli.folder,
                                capture_output=True, text=True, timeout=900)
        stop.set()
        jobs = [job for job in cluster.client.list_jobs()
                if (job.metadata or {}).get("dagster/op", "").startswith(FEATURISE)]
        yield {"result": result, "seconds": time.monotonic() - started, "killed": killed,
               "in_process_seconds": in_process_seconds,
               "jobs": jobs, "workers": cluster.workers(), "head": cluster.head_node,
               "store": store, "reference": reference,
               "home": Path(env["DAGSTER_HOME"])}


@pytest.mark.slow
def test_features_made_on_ray_are_byte_identical(ray_run) -> None:
    result = ray_run["result"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    expected = _files(ray_run["reference"] / "small")
    got = _files(ray_run["store"] / "gradient_shards" / "small")
    assert expected.keys() == got.keys()
    assert [name for name in expected if expected[name] != got[name]] == []
    assert sum("/shard-" in name for name in got) >= 4


@pytest.mark.slow
def test_each_featurisation_step_ran_as_a_ray_job_on_a_worker(ray_run) -> None:
    jobs = ray_run["jobs"]
    succeeded = {job.metadata["dagster/op"]: job for job in jobs if job.status == "SUCCEEDED"}
    with dg.DagsterInstance.from_config(str(ray_run["home"])) as instance:
        (run,) = [r for r in instance.get_runs() if r.run_id == ray_run["killed"]["run_id"]]
        starts = [e for e in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START)
                  if e.step_key.startswith(FEATURISE)]
    assert {e.step_key for e in starts} == set(succeeded)
    nodes = {job.driver_node_id for job in succeeded.values()}
    assert nodes <= ray_run["workers"] and not nodes & ray_run["head"]
    assert len(nodes) == WORKERS  # the steps spread over both workers
    pids = {e.dagster_event.pid for e in starts}
    assert len(pids) == len(starts) and os.getpid() not in pids  # one process per attempt
    print(json.dumps({"seconds": round(ray_run["seconds"], 1),
                      "in_process_seconds": round(ray_run["in_process_seconds"], 1),
                      "killed": ray_run["killed"], "steps": sorted(succeeded),
                      "nodes": sorted(nodes), "pids": sorted(pids)}, indent=1))


@pytest.mark.slow
def test_a_killed_step_is_retried_on_ray(ray_run) -> None:
    killed = ray_run["killed"]
    assert killed, "no featurisation step was seen starting"
    attempts = sorted((job for job in ray_run["jobs"]
                       if job.metadata["dagster/op"] == killed["step"]),
                      key=lambda job: job.start_time)
    assert [job.status for job in attempts] == ["FAILED", "SUCCEEDED"]
    with dg.DagsterInstance.from_config(str(ray_run["home"])) as instance:
        retried = instance.all_logs(killed["run_id"],
                                    of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY)
    assert [e.step_key for e in retried] == [killed["step"]]
