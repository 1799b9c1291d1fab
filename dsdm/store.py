"""Artifact store: one fsspec root URL (a local folder or ``s3://bucket/prefix``).

Every artifact lives at a path derived from what made it (asset, crawl, a fingerprint of the
config and inputs), so a re-run with the same inputs finds its artifacts instead of
recomputing them. Writes are atomic: a reader never sees a half-written file under its
final name.
"""

import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (configs, input sha256s, code versions)."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def file_sha256(fs: Any, path: str, chunk_bytes: int = 1 << 22) -> str:
    """sha256 of the file at filesystem path ``path`` of ``fs``, streamed (memory: one chunk)."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


#: Rows per Parquet row group: what a streaming reader holds at once.
PARQUET_ROW_GROUP_ROWS = 16_384


@dataclass(frozen=True)
class StoredArtifact:
    """What the lineage table needs to know about one written file."""

    uri: str
    sha256: str
    size_bytes: int


class ArtifactStore:
    """Reads and writes artifacts below ``root_url``.

    ``storage_options`` go to fsspec (for S3: ``endpoint_url`` through ``client_kwargs``,
    never credentials: s3fs reads those from the environment).
    """

    def __init__(self, root_url: str, storage_options: Mapping[str, Any] | None = None):
        self.fs, root = fsspec.core.url_to_fs(root_url, **dict(storage_options or {}))
        self.root = root.rstrip("/")
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self._is_local = self.protocol in ("file", "local")
        if self._is_local:
            os.makedirs(self.root, exist_ok=True)

    def path(self, relpath: str) -> str:
        """Filesystem path (no protocol) of ``relpath`` below the root."""
        if relpath.startswith("/") or ".." in relpath.split("/"):
            raise ValueError(f"artifact path must be relative and stay below the root: {relpath!r}")
        return f"{self.root}/{relpath}"

    def uri(self, relpath: str) -> str:
        """Full URL of ``relpath``, as recorded in lineage."""
        path = self.path(relpath)
        return f"file://{path}" if self._is_local else f"{self.protocol}://{path}"

    def relpath(self, uri: str) -> str:
        """Inverse of `uri`: the path below the root of a URI this store recorded; a
        ValueError for a URI outside it (another store, another root)."""
        prefix = self.uri("")
        if not uri.startswith(prefix):
            raise ValueError(f"{uri} is not in the artifact store at {prefix}")
        return uri[len(prefix):]

    def exists(self, relpath: str) -> bool:
        return self.fs.exists(self.path(relpath))

    def list(self, prefix: str) -> list[str]:
        """Relative paths of the files below ``prefix`` (sorted; temporary files excluded)."""
        base = self.path(prefix)
        if not self.fs.exists(base):
            return []
        found = self.fs.find(base)
        rel = [p[len(self.root) + 1 :] if p.startswith(self.root) else p for p in found]
        return sorted(r for r in rel if ".part-" not in r.rsplit("/", 1)[-1])

    def claim(self, relpath: str, on_wait: Any = None) -> Any:
        """An exclusive claim on ``relpath`` (e.g. one asset folder) among the processes that
        share this store, blocking while another holds it; release it with ``.close()`` (or
        by ending the process). ``on_wait()`` is called once if it has to wait. Local stores
        only (an advisory ``flock`` on ``_locks/<relpath>.lock``); on an object store it is
        None: coordinate runs there with Dagster's run queue (docs/OPERATIONS.md)."""
        if not self._is_local:
            return None
        import fcntl  # POSIX; the local store runs where the pipeline runs

        path = self.path(f"_locks/{relpath}.lock")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle = open(path, "a")  # noqa: SIM115 - held open until released
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        return handle

    def remove_file(self, relpath: str) -> None:
        """Delete the file at ``relpath`` if it exists."""
        if self.exists(relpath):
            self.fs.rm_file(self.path(relpath))

    def remove_folder(self, relpath: str) -> int:
        """Delete the folder ``relpath`` and everything below it; returns the files removed
        (0 when it does not exist)."""
        files = self.list(relpath)
        if self.fs.exists(self.path(relpath)):
            self.fs.rm(self.path(relpath), recursive=True)
        return len(files)

    def write_bytes(self, relpath: str, data: bytes) -> StoredArtifact:
        """Write ``data`` atomically and return its URI and sha256."""
        path = self.path(relpath)
        if self._is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.part-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            # An object-store PUT is atomic: the key appears only once the upload completed.
            self.fs.pipe_file(path, data)
        return StoredArtifact(self.uri(relpath), hashlib.sha256(data).hexdigest(), len(data))

    def read_bytes(self, relpath: str) -> bytes:
        return self.fs.cat_file(self.path(relpath))

    def write_json(self, relpath: str, obj: Any) -> StoredArtifact:
        return self.write_bytes(relpath, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, relpath: str) -> Any:
        return json.loads(self.read_bytes(relpath))

    def write_parquet(self, relpath: str, table: pa.Table) -> StoredArtifact:
        sink = io.BytesIO()
        # Bounded row groups: a reader that streams the file (iter_parquet) holds one.
        pq.write_table(table, sink, compression="zstd", row_group_size=PARQUET_ROW_GROUP_ROWS)
        return self.write_bytes(relpath, sink.getvalue())

    def sha256(self, relpath: str) -> str:
        """sha256 of the file at ``relpath``, streamed (memory: one chunk)."""
        return file_sha256(self.fs, self.path(relpath))

    def mismatch(self, relpath: str, sha256: str, size_bytes: int | None = None) -> str | None:
        """Why the file at ``relpath`` is not the one recorded (missing, other size, other
        sha256), or None when it is. The size is compared first: it costs no read."""
        if not self.exists(relpath):
            return "missing"
        if size_bytes is not None and (size := self.fs.size(self.path(relpath))) != size_bytes:
            return f"{size} bytes, recorded {size_bytes}"
        found = self.sha256(relpath)
        return None if found == sha256 else f"sha256 {found[:12]}..., recorded {sha256[:12]}..."

    def read_parquet(self, relpath: str, columns: Iterable[str] | None = None) -> pa.Table:
        with self.fs.open(self.path(relpath), "rb") as handle:
            return pq.read_table(handle, columns=list(columns) if columns else None)

    def iter_parquet(self, relpath: str, columns: Iterable[str] | None = None,
                     batch_rows: int = 1024) -> Iterator[pa.RecordBatch]:
        """The file's rows in batches of at most ``batch_rows``, read as they are consumed
        (memory: about one row group), in file order."""
        with self.fs.open(self.path(relpath), "rb") as handle:
            yield from pq.ParquetFile(handle).iter_batches(
                batch_size=batch_rows, columns=list(columns) if columns else None)
