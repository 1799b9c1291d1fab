"""How an asset hands its manifest to the assets that read it.

Every asset's value is its `Upstream`: the store path of the ``manifest.json`` it wrote last,
with the manifest itself. The manifest IO manager keeps only that path, in the
materialisation's metadata (``dsdm/manifest``); a downstream asset names its inputs as typed
parameters (``def tokenized_corpus(context, config, documents: Upstream, tokenizer:
Upstream)``) and receives the latest materialisation of each for the same crawl, read back
from the store and checked file by file against the sha256s it recorded. Data never travels
through Dagster: assets read the files the manifest lists, shard by shard.

An input annotated ``Upstream | None`` is optional: None when that asset was never
materialised for the crawl (e.g. a selection method that an evaluation does not compare).
"""

import warnings
from collections.abc import Callable
from typing import Any

import dagster as dg

from dsdm.store import ArtifactStore
from dsdm_assets.jobs import CPU_STEP_TAGS, STEP_RETRY_POLICY, TORCH_STEP_TAGS, StepKind
from dsdm_assets.partitions import crawl_partitions
from dsdm_assets.recording import MANIFEST_KEY, Upstream, read_manifest

#: the Dagster type of every asset's value and of every upstream input
UPSTREAM = dg.PythonObjectDagsterType(Upstream, name="Upstream",
                                      description="An asset's manifest in the artifact store.")
#: resource key of the manifest IO manager where an op (not an asset) declares its output
MANIFEST_IO = "manifest_io"


class ManifestIOManager(dg.IOManager):
    """Stores an asset's manifest path; loads the latest one of an upstream asset for the
    crawl being run, verified, as an `Upstream`."""

    def __init__(self, store: ArtifactStore):
        self.store = store

    def handle_output(self, context: dg.OutputContext, obj: Upstream) -> None:
        context.add_output_metadata({MANIFEST_KEY: obj.path})

    def load_input(self, context: dg.InputContext) -> Upstream | None:
        asset, crawl = context.asset_key.to_user_string(), context.asset_partition_key
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=context.asset_key, asset_partitions=[crawl]), limit=1
        ).records
        if not records:
            if context.dagster_type.kind.name == "NULLABLE":  # annotated `Upstream | None`
                return None
            raise dg.Failure(f"{asset} has not been materialised for crawl {crawl!r}; run it first")
        metadata = records[0].asset_materialization.metadata
        if MANIFEST_KEY not in metadata:
            raise dg.Failure(f"latest {asset} materialisation for {crawl!r} has no manifest path")
        return read_manifest(self.store, metadata[MANIFEST_KEY].value, asset, crawl)


@dg.io_manager(required_resource_keys={"store"},
               description="An asset's manifest path, kept in its materialisation metadata.")
def manifest_io_manager(init_context: dg.InitResourceContext) -> ManifestIOManager:
    return ManifestIOManager(init_context.resources.store.get_store())


def crawl_asset(*, group: str, kind: StepKind = "cpu", **kwargs: Any) -> Callable:
    """``@dg.asset`` for one crawl (a dynamic partition) whose value is its manifest: the
    manifest IO manager, the step tags and retry policy of a ``kind`` step, and ``kwargs``
    (code_version, description, check_specs, ...) as ``@dg.asset`` takes them."""

    def decorate(fn: Callable) -> dg.AssetsDefinition:
        # io_manager_def travels with the asset, so any caller's resources can load it; it is
        # marked beta in Dagster 1.13, a warning every step process would print
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dg.BetaWarning)
            return dg.asset(
                group_name=group, partitions_def=crawl_partitions,
                io_manager_def=manifest_io_manager, dagster_type=UPSTREAM,
                op_tags=TORCH_STEP_TAGS if kind == "torch" else CPU_STEP_TAGS,
                retry_policy=STEP_RETRY_POLICY, **kwargs,
            )(fn)

    return decorate
