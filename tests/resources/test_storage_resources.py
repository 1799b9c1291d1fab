"""Resources from the environment, and the JSON values steps hand each other through the
artifact store (readable by a step in another process or container, never pickled)."""

import json

import dagster as dg
import pytest

from dsdm.store import ArtifactStore
from resources import default_resources
from resources.storage import STEP_VALUES, StepJsonIOManager


def test_default_resources_follow_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("DSDM_STORE", "s3://bucket/prefix")
    monkeypatch.setenv("DSDM_S3_ENDPOINT", "http://127.0.0.1:9000")
    monkeypatch.setenv("DSDM_CRAWL_ROOT", "s3://bucket/crawls")
    monkeypatch.setenv("DSDM_THREADS", "3")
    resources = default_resources()
    assert resources["store"].storage_options() == {
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}
    assert resources["crawls"].crawl_url("c1") == "s3://bucket/crawls/c1"
    assert resources["compute"].threads == 3
    monkeypatch.setenv("DSDM_STORE", str(tmp_path))
    assert default_resources()["store"].storage_options() == {}  # no S3 options locally


def test_a_bad_thread_count_names_the_variable(monkeypatch) -> None:
    monkeypatch.setenv("DSDM_THREADS", "four")
    with pytest.raises(ValueError, match="DSDM_THREADS='four'"):
        default_resources()


def test_step_values_round_trip_as_json_files(tmp_path) -> None:
    store = ArtifactStore(str(tmp_path))
    manager = StepJsonIOManager(store)
    value = {"folder": "gradient_shards/small/abc", "shards": 3, "inputs": [["uri", "sha"]]}
    output = dg.build_output_context(step_key="plan", name="work", run_id="run-1",
                                     mapping_key="proxy_00_shard_00002")
    manager.handle_output(output, value)
    (written,) = [p for p in tmp_path.rglob("*.json")]
    assert written.relative_to(tmp_path).parts[0] == STEP_VALUES
    assert json.loads(written.read_text()) == value
    loaded = manager.load_input(dg.build_input_context(upstream_output=output))
    assert loaded == value


def test_a_value_that_is_not_json_is_refused_with_the_step(tmp_path) -> None:
    manager = StepJsonIOManager(ArtifactStore(str(tmp_path)))
    output = dg.build_output_context(step_key="plan", name="work", run_id="run-1")
    with pytest.raises(TypeError, match="step plan output 'work' must be JSON"):
        manager.handle_output(output, {"tensor": object()})
