"""What every asset does around its engine call: find reusable work, write artifacts under a
content-derived folder, write a manifest, record lineage rows, read upstream manifests.

Large data never travels through Dagster's IO managers. Each materialisation writes a
``manifest.json`` (files, sha256s, row counts, config) into the artifact store; the manifest
IO manager (`dsdm_assets.manifests`) puts its path in the materialisation metadata under
``MANIFEST_KEY`` and hands it to downstream assets as an `Upstream`.
"""

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import pyarrow as pa

from dsdm import __version__
from dsdm.artifacts import MANIFEST, Upstream, asset_folder
from dsdm.lineage import ArtifactRecord, LineageDB, result_rows
from dsdm.store import ArtifactStore, StoredArtifact, fingerprint

MANIFEST_KEY = "dsdm/manifest"


def read_manifest(store: ArtifactStore, path: str, asset: str, crawl: str) -> Upstream:
    """The manifest at store ``path`` of ``asset``'s materialisation for ``crawl``, every file
    it lists checked against the size and sha256 it recorded (dg.Failure naming each one that
    differs)."""
    data = store.read_bytes(path)
    upstream = Upstream(path, store.uri(path), hashlib.sha256(data).hexdigest(), json.loads(data))
    changed = verify_files(store, upstream.manifest)
    if changed:
        listed = "; ".join(f"{p}: {reason}" for p, reason in changed.items())
        raise dg.Failure(f"{asset} for crawl {crawl!r}: {len(changed)} stored file(s) are not what "
                         f"its manifest recorded ({listed}); materialise {asset} again, which "
                         "recomputes exactly those")
    return upstream


def require_made_from(made: Upstream, made_name: str, source: Upstream, source_name: str) -> None:
    """Fail unless ``made`` (e.g. the proxies) was built from this very ``source`` (e.g. the
    latest tokenized corpus): after a new tokenizer, proxies of the old one would embed or
    featurise token ids that mean other text."""
    if {"uri": source.uri, "sha256": source.sha256} not in made.manifest["inputs"]:
        raise dg.Failure(f"{made_name} was built from another {source_name} than the latest "
                         f"({source.path}); materialise {made_name} again first")


@dataclass(frozen=True)
class RecordedSelection:
    """A selection of an earlier run, found through the lineage database: the asset that
    made it, its ``manifest.parquet`` (uri and recorded sha256) and its example ids in rank
    order."""

    selection_id: str
    asset: str
    uri: str
    sha256: str
    example_ids: list[str]


def read_selection(store: ArtifactStore, db: LineageDB, crawl: str,
                   selection_id: str) -> RecordedSelection:
    """The selection ``selection_id`` of ``crawl`` (any method), its manifest checked against
    the sha256 the lineage recorded; dg.Failure naming the id when there is no such selection
    or its file changed."""
    found = db.query(
        "SELECT asset, uri, sha256 FROM artifacts WHERE crawl = ? AND config_hash = ? "
        "AND uri LIKE '%/manifest.parquet' ORDER BY recorded_at DESC LIMIT 1",
        [crawl, selection_id]).to_pylist()
    if not found:
        known = db.query("SELECT DISTINCT selection_id FROM selections WHERE crawl = ? "
                         "ORDER BY 1", [crawl]).column("selection_id").to_pylist()
        raise dg.Failure(f"previous_selection {selection_id!r}: crawl {crawl!r} has no selection "
                         f"with this id (its selections: {known or 'none'})")
    row = found[0]
    path = store.relpath(row["uri"])
    reason = store.mismatch(path, row["sha256"])
    if reason:
        raise dg.Failure(f"previous_selection {selection_id!r}: {row['uri']} is not the file the "
                         f"lineage recorded ({reason}); materialise {row['asset']} again")
    ids = store.read_parquet(path, columns=["example_id"]).column("example_id").to_pylist()
    return RecordedSelection(selection_id, row["asset"], row["uri"], row["sha256"], ids)


def verify_files(store: ArtifactStore, manifest: dict[str, Any]) -> dict[str, str]:
    """Store path -> why it differs, for every file of ``manifest`` that is missing or is not
    the size and sha256 recorded (sha256 streamed; nothing is loaded)."""
    changed = {}
    for f in manifest["files"]:
        reason = store.mismatch(f["path"], f["sha256"], f.get("size_bytes"))
        if reason:
            changed[f["path"]] = reason
    return changed


def adopt_file(store: ArtifactStore, path: str) -> tuple[bytes, StoredArtifact]:
    """A file an interrupted earlier attempt finished, read back with its sha256 (writes are
    atomic, so an existing file is complete)."""
    data = store.read_bytes(path)
    return data, StoredArtifact(store.uri(path), hashlib.sha256(data).hexdigest(), len(data))


def read_recorded(store: ArtifactStore, entry: dict[str, Any]) -> bytes | None:
    """The bytes of the file another finished folder's manifest lists (``entry``), if it is
    still the file recorded; None when it is missing or changed. For copying a file that
    depends only on what the two folders share (see `AssetWriter.lenders`)."""
    if not store.exists(entry["path"]):
        return None
    data = store.read_bytes(entry["path"])
    return data if hashlib.sha256(data).hexdigest() == entry["sha256"] else None


#: what an asset is made from: an upstream manifest, or (uri, sha256) of anything else
Input = Upstream | tuple[str, str]


def run_id(context: dg.OpExecutionContext) -> str:
    """The id of the Dagster run a step belongs to; ``direct`` for an asset called as a
    plain function (a unit test), which has no run."""
    try:
        return context.run.run_id
    except dg.DagsterError:
        return "direct"


def definition_code_version(context: dg.OpExecutionContext) -> tuple[str, str]:
    """(asset name, code version) of the asset whose step is running, from its definition
    (for a graph-backed asset, any of its ops); every asset sets a code version."""
    key = context.assets_def.key
    version = context.assets_def.code_versions_by_key.get(key)
    if version is None:
        raise dg.Failure(f"asset {key.to_user_string()} has no code_version; set one")
    return key.to_user_string(), version


@dataclass
class AssetWriter:
    """Artifacts of one asset for one crawl under ``<asset>/<crawl>/<fingerprint>/``; the
    asset's name and code version come from its definition."""

    context: dg.OpExecutionContext
    store: ArtifactStore
    lineage: LineageDB
    config: dict[str, Any]
    inputs: Sequence[Input]
    """Everything it is made from; kept as (uri, sha256) pairs."""
    asset: str = ""
    code_version: str = ""
    #: (name, artifact, rows, kind, adopted): adopted files were finished by an earlier,
    #: interrupted attempt (or, for shared files, by any earlier run) and taken over instead
    #: of recomputed. A name is relative to `folder`, or a store path for a shared file.
    written: list[tuple[str, StoredArtifact, int | None, str, bool]] = field(default_factory=list)
    shared: set[str] = field(default_factory=set)
    """Names in `written` that are store paths outside `folder` (see `write_shared`)."""
    replaced: dict[str, str] = field(default_factory=dict)
    """Store path -> reason, for files of an earlier manifest found changed (`existing`)."""
    _claim: Any = None
    """This folder's claim among processes sharing the store, from `existing` to `record`."""

    def __post_init__(self) -> None:
        self.asset, self.code_version = definition_code_version(self.context)
        self.inputs = [(i.uri, i.sha256) if isinstance(i, Upstream) else tuple(i)
                       for i in self.inputs]

    @property
    def crawl(self) -> str:
        return self.context.partition_key

    @property
    def config_hash(self) -> str:
        return fingerprint(self.asset, self.code_version, __version__, self.config, sorted(self.inputs))

    @property
    def folder(self) -> str:
        return asset_folder(self.asset, self.crawl, self.config_hash)

    @property
    def manifest_path(self) -> str:
        return f"{self.folder}/{MANIFEST}"

    def existing(self) -> dict[str, Any] | None:
        """The manifest of an earlier run with identical config and inputs, if complete and
        every file it lists is still the one it recorded. A missing or changed file is
        logged and removed with the manifest, so the asset recomputes it (adopting the files
        that are intact); the new manifest and its lineage rows name what was replaced.

        First it claims the folder: a second run of the same partition waits here while the
        first computes, then reuses its work instead of doing it twice and rewriting files the
        first recorded. The claim is released when the lineage is recorded."""
        if self._claim is None:
            self._claim = self.store.claim(self.folder, on_wait=lambda: self.context.log.info(
                f"{self.asset}: another run is computing {self.folder}; waiting to reuse it"))
        if not self.store.exists(self.manifest_path):
            return None
        manifest = self.store.read_json(self.manifest_path)
        self.replaced = verify_files(self.store, manifest)
        if not self.replaced:
            return manifest
        for path, reason in self.replaced.items():
            self.context.log.warning(f"{self.asset}: stored {path} is not the file its manifest "
                                     f"recorded ({reason}); recomputing it")
            self.store.remove_file(path)
        self.store.remove_file(self.manifest_path)
        return None

    def write_parquet(self, name: str, table: pa.Table, kind: str) -> StoredArtifact:
        stored = self.store.write_parquet(f"{self.folder}/{name}", table)
        self.written.append((name, stored, table.num_rows, kind, False))
        return stored

    def write_bytes(self, name: str, data: bytes, kind: str, rows: int | None = None) -> StoredArtifact:
        stored = self.store.write_bytes(f"{self.folder}/{name}", data)
        self.written.append((name, stored, rows, kind, False))
        return stored

    def has(self, name: str) -> bool:
        return self.store.exists(f"{self.folder}/{name}")

    def adopt(self, name: str, kind: str, rows: int | None = None) -> bytes:
        """Take a file an interrupted earlier attempt finished (writes are atomic, so an
        existing file is complete) into this manifest instead of recomputing it."""
        data, stored = adopt_file(self.store, f"{self.folder}/{name}")
        self.written.append((name, stored, rows, kind, True))
        return data

    def lenders(self) -> list[dict[str, Any]]:
        """Manifests of the other finished folders of this asset and crawl made by the same
        code: the folders whose files this one may copy where they depend only on what the
        two share, e.g. proxy m of a smaller ensemble. The caller decides which files
        qualify and reads each with `read_recorded`."""
        prefix = asset_folder(self.asset, self.crawl, "")
        manifests = []
        for path in self.store.list(prefix):
            if path.count("/") != prefix.count("/") + 1 or not path.endswith(f"/{MANIFEST}"):
                continue
            manifest = self.store.read_json(path)
            if (path != self.manifest_path and manifest.get("code_version") == self.code_version
                    and manifest.get("dsdm_version") == __version__):
                manifests.append(manifest)
        return manifests

    def write_copied(self, name: str, data: bytes, kind: str, rows: int | None = None) -> None:
        """Write a file copied from a lender (`read_recorded`), listed as adopted."""
        stored = self.store.write_bytes(f"{self.folder}/{name}", data)
        self.written.append((name, stored, rows, kind, True))

    def shared_path(self, kind: str, key: str, suffix: str = ".json") -> str:
        """Store path of a result shared by every materialisation whose work includes it:
        ``<kind>/<crawl>/<key><suffix>``, ``key`` a fingerprint of all it depends on (e.g.
        one evaluation model: its training examples, recipe, seed and targets)."""
        return f"{kind}/{self.crawl}/{key}{suffix}"

    def write_shared(self, path: str, data: bytes, kind: str) -> StoredArtifact:
        """Write a shared result (see `shared_path`) and list it in this manifest."""
        stored = self.store.write_bytes(path, data)
        self.written.append((path, stored, None, kind, False))
        self.shared.add(path)
        return stored

    def adopt_shared(self, path: str, kind: str) -> bytes | None:
        """A shared result an earlier run made, listed in this manifest as adopted; None when
        it does not exist yet."""
        if not self.store.exists(path):
            return None
        data, stored = adopt_file(self.store, path)
        self.written.append((path, stored, None, kind, True))
        self.shared.add(path)
        return data

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write the manifest last (its presence marks the folder complete); record lineage."""
        manifest = {
            "asset": self.asset, "crawl": self.crawl, "config": self.config,
            "config_hash": self.config_hash, "code_version": self.code_version,
            "dsdm_version": __version__, "run_id": run_id(self.context),
            "inputs": [{"uri": u, "sha256": s} for u, s in self.inputs],
            "files": [
                {"name": name, "path": name if name in self.shared else f"{self.folder}/{name}",
                 "uri": s.uri, "sha256": s.sha256,
                 "size_bytes": s.size_bytes, "rows": rows, "kind": kind, "adopted": adopted}
                for name, s, rows, kind, adopted in self.written
            ],
            "summary": summary,
            **({"replaced": self.replaced} if self.replaced else {}),
        }
        self.store.write_json(self.manifest_path, manifest)
        self.record(manifest, reused=False)
        return manifest

    def record(self, manifest: dict[str, Any], reused: bool) -> None:
        """One lineage row per file and one for the manifest, with input edges."""
        common = dict(
            asset=self.asset, crawl=self.crawl, config_hash=self.config_hash,
            code_version=f"{self.asset}@{self.code_version}/dsdm@{__version__}",
            run_id=run_id(self.context), reused=reused, inputs=list(self.inputs),
        )
        manifest_bytes = self.store.read_bytes(self.manifest_path)
        records = [
            ArtifactRecord(uri=f["uri"], sha256=f["sha256"], size_bytes=f["size_bytes"],
                           row_count=f["rows"],
                           extra={"kind": f["kind"], "adopted": f.get("adopted", False),
                                  **({"replaced": manifest["replaced"][f["path"]]}
                                     if f["path"] in manifest.get("replaced", {}) else {})},
                           **common)
            for f in manifest["files"]
        ]
        records.append(ArtifactRecord(
            uri=self.store.uri(self.manifest_path),
            sha256=hashlib.sha256(manifest_bytes).hexdigest(),
            size_bytes=len(manifest_bytes), extra={"kind": "manifest"}, **common,
        ))
        self.lineage.record_artifacts(records)
        self.release()

    def release(self) -> None:
        """Give up this folder's claim (see `existing`); done by `record`."""
        if self._claim is not None:
            self._claim.close()
            self._claim = None

    def output(self) -> Upstream:
        """This folder's finished manifest as the asset's value (what downstream assets get)."""
        data = self.store.read_bytes(self.manifest_path)
        return Upstream(self.manifest_path, self.store.uri(self.manifest_path),
                        hashlib.sha256(data).hexdigest(), json.loads(data))

    def base_metadata(self, manifest: dict[str, Any], reused: bool) -> dict[str, Any]:
        return {
            "manifest_uri": dg.MetadataValue.path(self.store.uri(self.manifest_path)),
            "config_hash": self.config_hash,
            "reused": reused,
            "files": len(manifest["files"]),
            "bytes": sum(f["size_bytes"] for f in manifest["files"]),
        }

    @property
    def data_version(self) -> dg.DataVersion:
        """Dagster's data version: the folder hash of (config, inputs, code). A change
        upstream marks every downstream asset stale in the UI."""
        return dg.DataVersion(self.config_hash)


@dataclass
class Made:
    """An asset's folder for one crawl, finished: reused, or written by this step."""

    writer: AssetWriter
    manifest: dict[str, Any]
    reused: bool

    @property
    def summary(self) -> dict[str, Any]:
        return self.manifest["summary"]

    @property
    def folder(self) -> str:
        return self.writer.folder

    def metadata(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """What every asset shows (folder hash, reuse, files, bytes), then ``extra``."""
        return {**self.writer.base_metadata(self.manifest, self.reused), **(extra or {})}

    def result(self, metadata: dict[str, Any] | None = None,
               check_results: Sequence[dg.AssetCheckResult] = ()) -> dg.MaterializeResult:
        """The asset's return value: its manifest (for the manifest IO manager), its data
        version and metadata, and its check results."""
        return dg.MaterializeResult(value=self.writer.output(), data_version=self.writer.data_version,
                                    metadata=self.metadata(metadata), check_results=list(check_results))


def produce(context: dg.OpExecutionContext, store: ArtifactStore, lineage: LineageDB,
            config: dict[str, Any], inputs: Sequence[Input],
            compute: Callable[[AssetWriter], dict[str, Any]],
            verified: dict[str, Any] | None = None) -> Made:
    """The reuse protocol, the same for every asset. The folder is named by the asset, the
    crawl and a fingerprint of ``config``, ``inputs`` and the asset definition's code
    version. A finished folder whose files are all still the ones its manifest recorded is
    reused (lineage rows with reused = true); otherwise ``compute(writer)`` writes the files
    (each atomically; it adopts those an interrupted attempt finished) and returns the
    summary, and the manifest is written last and recorded. ``verified``: the manifest of
    this folder that an earlier step of this run already checked (it is not read again)."""
    writer = AssetWriter(context, store, lineage, config, inputs)
    manifest = verified if verified is not None else writer.existing()
    if manifest is not None:
        writer.record(manifest, reused=True)
        context.log.info(f"{writer.asset} for {writer.crawl} unchanged: reusing {writer.folder}")
        return Made(writer, manifest, reused=True)
    return Made(writer, writer.finish(compute(writer)), reused=False)


def record_rows(db: LineageDB, table: str, constants: dict[str, str],
                rows: pa.Table | Iterable[pa.RecordBatch | pa.Table], key: Sequence[str],
                schema: pa.Schema | None = None) -> int:
    """Replace the rows of the result ``table`` whose ``key`` columns hold ``constants``'
    values by ``constants`` + ``rows`` (a table, or batches of ``schema``, with the table's
    remaining columns in order), streamed; returns the rows inserted."""
    if isinstance(rows, pa.Table):
        schema, rows = schema or rows.schema, [rows]
    return db.replace_rows(table, {k: constants[k] for k in key}, result_rows(constants, rows, schema))
