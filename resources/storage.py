"""Where artifacts are written, where crawls are read from (local folder or S3), and where the
small values that steps of one run hand to each other are kept."""

import json
from typing import Any

import dagster as dg
from pydantic import Field

from dsdm.store import ArtifactStore


def _s3_options(endpoint_url: str | None, region: str | None) -> dict[str, Any]:
    # Credentials are never configuration: s3fs reads AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY
    # (or a profile/instance role) from the environment, so they cannot leak into metadata.
    client_kwargs = {k: v for k, v in {"endpoint_url": endpoint_url, "region_name": region}.items() if v}
    return {"client_kwargs": client_kwargs} if client_kwargs else {}


class ArtifactStoreResource(dg.ConfigurableResource):
    """Artifact store root: ``./.dsdm/store`` by default, ``s3://bucket/prefix`` in production."""

    root_url: str = Field(".dsdm/store", description="fsspec URL of the artifact root.")
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, R2, moto); None for AWS."
    )
    region: str | None = Field(None, description="S3 region, if the endpoint needs one.")

    def storage_options(self) -> dict[str, Any]:
        return _s3_options(self.endpoint_url, self.region) if self.root_url.startswith("s3://") else {}

    def get_store(self) -> ArtifactStore:
        return ArtifactStore(self.root_url, self.storage_options())


class CrawlSourceResource(dg.ConfigurableResource):
    """The folder (or S3 prefix) under which each crawl is a sub-folder named after it."""

    root_url: str = Field("data/crawls", description="fsspec URL holding one folder per crawl.")
    tasks_url: str = Field("data/tasks", description="fsspec URL holding <task>.jsonl.gz files.")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, if any.")
    region: str | None = Field(None, description="S3 region, if the endpoint needs one.")

    def crawl_url(self, crawl: str) -> str:
        return f"{self.root_url.rstrip('/')}/{crawl}"

    def storage_options(self) -> dict[str, Any]:
        return _s3_options(self.endpoint_url, self.region) if self.root_url.startswith("s3://") else {}


STEP_VALUES = "_steps"


def step_values_folder(run_id: str) -> str:
    """Store folder of the JSON values the steps of run ``run_id`` hand each other."""
    return f"{STEP_VALUES}/{run_id}"


class StepJsonIOManager(dg.IOManager):
    """Keeps the small JSON values one step hands to the next (work lists, per-file results)
    in the artifact store under ``_steps/<run>/<step>/<output>[/<mapping key>].json``.

    Why not Dagster's default: that one pickles to the local disk of the process that ran the
    step, which a step in another container (k8s job executor) cannot read, and pickle can run
    code. Large data never comes here: steps pass store paths, not tensors.
    """

    def __init__(self, store: ArtifactStore):
        self.store = store

    @staticmethod
    def _path(identifier: list[str]) -> str:
        run_id, *rest = identifier
        return f"{step_values_folder(run_id)}/{'/'.join(rest)}.json"

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        try:
            data = json.dumps(obj, sort_keys=True).encode()
        except TypeError as error:
            raise TypeError(
                f"step {context.step_key} output {context.name!r} must be JSON (dicts, lists, "
                f"strings, numbers): {error}"
            ) from error
        self.store.write_bytes(self._path(list(context.get_identifier())), data)

    def load_input(self, context: dg.InputContext) -> Any:
        return json.loads(self.store.read_bytes(self._path(list(context.upstream_output.get_identifier()))))


@dg.io_manager(required_resource_keys={"store"},
               description="JSON values between the steps of one asset, in the artifact store.")
def step_json_io_manager(init_context: dg.InitResourceContext) -> StepJsonIOManager:
    return StepJsonIOManager(init_context.resources.store.get_store())
