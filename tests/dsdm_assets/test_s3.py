"""The pipeline with crawl root, target tasks and artifact store all on S3 (a moto server on
loopback): DuckDB gets its rows, every recorded artifact is an object in the bucket, the
new-crawl sensor sees the crawl there, the secret key appears nowhere the pipeline writes,
and a store outage in the middle of featurisation costs only the unfinished shards."""

import io
import socket
from pathlib import Path

import boto3
import dagster as dg
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from moto.server import ThreadedMotoServer

from dsdm.store import ArtifactStore
from dsdm_assets.definitions import defs
from dsdm_assets.partitions import crawl_partitions
from resources import ArtifactStoreResource, ComputeResource, CrawlSourceResource, LineageResource
from sensors.crawls import build_new_crawl_sensor

REPO = Path(__file__).resolve().parents[2]
BUCKET = "dsdm-test"
SECRET = "s3cret-key-that-must-not-leak-0f9e"
ASSETS = ["documents", "tokenizer", "tokenized_corpus", "target_tasks", "proxy_checkpoints",
          "gradient_shards", "target_gradients", "datamodel_weights", "mixture_runs",
          "selected_subset"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3(small_crawl_root):
    """A moto S3 server holding the small crawl and the target tasks; dummy credentials."""
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            env.delenv(key, raising=False)
        env.setenv("AWS_ACCESS_KEY_ID", "dsdm-test-key-id")
        env.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        for path in sorted((small_crawl_root / "small").iterdir()):
            client.upload_file(str(path), BUCKET, f"crawls/small/{path.name}")
        for path in sorted((REPO / "data" / "tasks").glob("*.jsonl.gz")):
            client.upload_file(str(path), BUCKET, f"tasks/{path.name}")
        try:
            yield endpoint, client
        finally:
            server.stop()


@pytest.fixture(scope="module")
def s3_run(s3, tmp_path_factory, fast_run_config):
    endpoint, client = s3
    folder = tmp_path_factory.mktemp("s3run")
    result = _materialise(endpoint, "store", folder, fast_run_config)
    assert result.success
    return folder, result, client


def _materialise(endpoint: str, prefix: str, folder, fast_run_config: dict, **kwargs):
    """The pipeline up to the DsDm selection with the store under s3://BUCKET/<prefix>."""
    resources = {
        "store": ArtifactStoreResource(root_url=f"s3://{BUCKET}/{prefix}", endpoint_url=endpoint),
        "crawls": CrawlSourceResource(root_url=f"s3://{BUCKET}/crawls",
                                      tasks_url=f"s3://{BUCKET}/tasks", endpoint_url=endpoint),
        "lineage": LineageResource(database=str(folder / "lineage.duckdb")),
        "compute": ComputeResource(device="cpu"),
    }
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(crawl_partitions.name, ["small"])
    run_config = {"ops": {k: v for k, v in fast_run_config["ops"].items() if k in ASSETS}}
    run_config["ops"]["target_tasks"] = {"config": {"tasks": ["wiki_qa"]}}
    return dg.materialize([a for a in defs.assets if a.key.to_user_string() in ASSETS],
                          partition_key="small", instance=instance, resources=resources,
                          run_config=run_config, **kwargs)


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.mark.slow
def test_scores_and_selection_land_in_duckdb(s3_run) -> None:
    folder, result, _ = s3_run
    (event,) = result.asset_materializations_for_node("tokenized_corpus")
    examples = event.metadata["examples"].value
    con = duckdb.connect(str(folder / "lineage.duckdb"), read_only=True)
    assert con.execute("SELECT task, count(*) FROM scores GROUP BY 1").fetchall() == [
        ("wiki_qa", examples)]
    assert con.execute("SELECT count(*) FROM selections WHERE crawl = 'small' AND method = 'dsdm'"
                       ).fetchone()[0] == examples // 5
    inputs = {r[0] for r in con.execute(
        "SELECT input_uri FROM artifact_inputs JOIN artifacts USING (artifact_id) "
        "WHERE asset = 'documents'").fetchall()}
    assert inputs == {f"s3://{BUCKET}/crawls/small/part-00000.jsonl.gz"}
    con.close()


@pytest.mark.slow
def test_every_recorded_artifact_is_an_object_in_the_bucket(s3_run) -> None:
    folder, _, client = s3_run
    con = duckdb.connect(str(folder / "lineage.duckdb"), read_only=True)
    recorded = {r[0]: (r[1], r[2]) for r in con.execute(
        "SELECT uri, asset, size_bytes FROM artifacts").fetchall()}
    con.close()
    stored = {f"s3://{BUCKET}/{key}" for key in _keys(client, "store/")}
    assert set(recorded) <= stored
    assets = {asset for asset, _ in recorded.values()}
    assert set(ASSETS) <= assets
    features = [u for u, (a, _) in recorded.items() if a == "gradient_shards" and "/shard-" in u]
    assert len(features) >= 4
    for uri in features:
        head = client.head_object(Bucket=BUCKET, Key=uri.removeprefix(f"s3://{BUCKET}/"))
        assert head["ContentLength"] == recorded[uri][1]
    assert not [k for k in stored if ".part-" in k]  # no temporary names on S3


@pytest.mark.slow
def test_secret_key_is_written_nowhere(s3_run) -> None:
    folder, result, client = s3_run
    assert SECRET.encode() not in (folder / "lineage.duckdb").read_bytes()
    for key in _keys(client, "store/"):
        if key.endswith(".json"):  # manifests and the values steps hand each other
            body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            assert SECRET.encode() not in body, key
    for event in result.get_asset_materialization_events():
        assert SECRET not in str(event.materialization.metadata)
    for record in result.all_events:
        assert SECRET not in str(record)


def test_sensor_finds_the_crawl_on_s3(s3) -> None:
    endpoint, _ = s3
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(
            instance=instance, definitions=defs,
            resources={"crawls": CrawlSourceResource(root_url=f"s3://{BUCKET}/crawls",
                                                     tasks_url=f"s3://{BUCKET}/tasks",
                                                     endpoint_url=endpoint)})
        result = build_new_crawl_sensor({})(context)
    assert [r.partition_key for r in result.run_requests] == ["small"]
    assert SECRET not in result.cursor


@pytest.mark.slow
def test_a_store_outage_mid_featurisation_costs_only_the_unfinished_shards(
        s3, s3_run, tmp_path, fast_run_config, monkeypatch) -> None:
    endpoint, client = s3
    shards = "outage/gradient_shards/small/"
    put = ArtifactStore.write_bytes
    stored: list[str] = []

    def put_until_two_shards(self, relpath: str, data: bytes):
        """The store accepts two feature shards, then every write fails as in an outage."""
        if len(stored) >= 2:
            raise OSError(f"simulated S3 outage writing {relpath}")
        result = put(self, relpath, data)
        if relpath.startswith("gradient_shards/") and relpath.endswith(".safetensors"):
            stored.append(relpath)
        return result

    monkeypatch.setattr(ArtifactStore, "write_bytes", put_until_two_shards)
    failed = _materialise(endpoint, "outage", tmp_path, fast_run_config, raise_on_error=False)
    assert not failed.success
    failures = [e for e in failed.all_events if e.is_step_failure]
    assert failures and all("simulated S3 outage" in str(e.event_specific_data.error)
                            for e in failures)
    monkeypatch.setattr(ArtifactStore, "write_bytes", put)  # the store is back

    left = _keys(client, shards)
    assert not [k for k in left if k.endswith("manifest.json")]  # unfinished: no manifest
    assert not [k for k in left if ".part-" in k]
    finished = [k for k in left if k.endswith(".safetensors")]
    assert len(finished) >= 2

    resumed = _materialise(endpoint, "outage", tmp_path, fast_run_config)
    assert resumed.success
    (event,) = resumed.asset_materializations_for_node("gradient_shards")
    meta = {k: v.value for k, v in event.metadata.items()}
    assert meta["files_reused"] == len(finished)
    assert meta["files_computed"] + meta["files_reused"] == meta["files"] > len(finished)

    def scores(prefix: str) -> pa.Table:
        (key,) = [k for k in _keys(client, f"{prefix}/datamodel_weights/small/")
                  if k.endswith("scores.parquet")]
        return pq.read_table(io.BytesIO(client.get_object(Bucket=BUCKET, Key=key)["Body"].read()))

    assert scores("outage").equals(scores("store"))  # as if the outage never happened
