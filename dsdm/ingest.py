"""Crawl ingest: read shards, validate, normalise, deduplicate, quarantine.

A crawl is a folder (local path, ``file://`` or ``s3://`` URL) of ``*.jsonl``, ``*.jsonl.gz``
and ``*.parquet`` shards. Every input row ends in exactly one of three places, so counts
reconcile: ``rows_read = accepted + quarantined + duplicates``.

- accepted: a document with ``doc_id`` = sha256 of its normalised text;
- quarantined: a row that failed validation, kept with file, row and reason;
- duplicate: a valid row whose normalised text was already accepted (first occurrence wins
  in file order), recorded with the id it duplicates.
"""

import gzip
import hashlib
import json
import os
import re
import stat
import unicodedata
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import polars as pl
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

SHARD_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
EXCERPT_CHARS = 200


class IngestConfig(BaseModel):
    """How crawl rows are validated and which fields they carry."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    text_field: str = Field("text", description="Field holding the document text.")
    id_field: str = Field("id", description="Field holding the crawl's own id (optional).")
    source_field: str = Field("source", description="Field naming the domain/source.")
    min_chars: int = Field(20, ge=1, description="Shorter normalised texts are quarantined.")
    max_chars: int = Field(
        1_000_000, ge=1, description="Longer normalised texts are quarantined (not truncated)."
    )

    @model_validator(mode="after")
    def _bounds(self) -> "IngestConfig":
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) exceeds max_chars ({self.max_chars})")
        return self


class CrawlError(ValueError):
    """The crawl as a whole cannot be read (missing folder, no shards)."""


@dataclass
class IngestResult:
    """Accepted documents plus everything that was not accepted, with reasons."""

    documents: pl.DataFrame  # doc_id, text, source, url, license, crawl_id, file, row, n_chars
    quarantine: pl.DataFrame  # file, row, reason, detail, excerpt
    rows_read: int
    files: list[str] = field(default_factory=list)

    @property
    def duplicates(self) -> int:
        return self.quarantine.filter(pl.col("reason") == "duplicate").height

    @property
    def quarantined(self) -> int:
        return self.quarantine.height - self.duplicates

    def reconciles(self) -> bool:
        return self.rows_read == self.documents.height + self.quarantine.height


def normalise_text(text: str) -> str:
    """Unicode NFC, unified newlines, runs of spaces/tabs collapsed, at most one blank line.

    Line structure is kept because code and documentation depend on it.
    """
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t\f\v\u00a0]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


#: Unicode categories that print nothing: separators, controls, format characters (zero-width
#: space and joiners, byte-order marks, bidi marks) and unassigned code points
_INVISIBLE_CATEGORIES = frozenset({"Zs", "Zl", "Zp", "Cc", "Cf", "Cn"})


def has_visible_text(text: str) -> bool:
    """True when `text` has at least one character that prints (not whitespace, control or a
    zero-width/format character)."""
    return any(unicodedata.category(c) not in _INVISIBLE_CATEGORIES for c in text)


def doc_id_of(normalised_text: str) -> str:
    """Content hash: the same text in any crawl gets the same id."""
    return hashlib.sha256(normalised_text.encode()).hexdigest()[:32]


def list_shards(crawl_url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Sorted shard paths of a crawl folder; raises ``CrawlError`` naming what is wrong."""
    fs, root = fsspec.core.url_to_fs(crawl_url, **(storage_options or {}))
    if not fs.exists(root):
        raise CrawlError(f"crawl folder not found: {crawl_url}")
    shards = sorted(
        p for p in fs.find(root)
        if p.endswith(SHARD_SUFFIXES) and not p.rsplit("/", 1)[-1].startswith((".", "_"))
    )
    if not shards:
        raise CrawlError(
            f"no shards in {crawl_url}: expected files ending in {', '.join(SHARD_SUFFIXES)}"
        )
    return shards


def shard_refusal(fs: Any, root: str, path: str) -> str | None:
    """Why the shard at `path` must not be read, or None. On a local crawl folder only regular
    files inside it are read: a link that leads out of the folder (its lines would land in the
    quarantine excerpts) or to a device, FIFO or socket (a read that never ends) is refused.
    Object stores have neither."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if not protocols & {"file", "local"}:
        return None
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        return f"a link to {real}, outside the crawl folder"
    if not stat.S_ISREG(os.stat(real).st_mode):
        return "not a regular file (a device, FIFO or socket)"
    return None


@dataclass(frozen=True)
class _RawRow:
    file: str
    row: int | None
    record: dict[str, Any] | None
    reason: str | None = None
    detail: str | None = None
    excerpt: str | None = None


def max_line_bytes(config: IngestConfig) -> int:
    """Longest JSON line that can hold an accepted document: max_chars characters of at most
    12 bytes each (a non-BMP character written as a JSON surrogate-pair escape) plus 64 KiB for
    the other fields. A longer line is quarantined as it streams, never held whole."""
    return 12 * config.max_chars + (1 << 16)


def _bounded_lines(stream: Any, max_bytes: int) -> Iterator[tuple[bytes, int]]:
    """(line, length) of each line; a line longer than `max_bytes` comes back as its first
    EXCERPT_CHARS bytes with its full length, the rest read and dropped in chunks, so memory
    stays within `max_bytes` whatever the input (a 200 MB line, a gzip bomb)."""
    while line := stream.readline(max_bytes + 1):
        if len(line) <= max_bytes or line.endswith(b"\n"):
            yield line, len(line)
            continue
        head, length = line[:EXCERPT_CHARS], len(line)
        while not line.endswith(b"\n") and (line := stream.readline(1 << 20)):
            length += len(line)
        yield head, length


def _iter_jsonl(fs: Any, path: str, line_limit: int) -> Iterator[_RawRow]:
    with fs.open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
        row = -1
        try:
            for row, (line, length) in enumerate(_bounded_lines(stream, line_limit)):
                if length > line_limit:
                    yield _RawRow(path, row, None, "line_too_long",
                                  f"{length} bytes > {line_limit} (12 x max_chars + 64 KiB)",
                                  line[:EXCERPT_CHARS].decode("utf-8", errors="replace"))
                    continue
                # A byte-order mark is an encoding artefact, not content.
                yield _parse_json_line(path, row, line.removeprefix(b"\xef\xbb\xbf") if row == 0 else line)
        except (EOFError, OSError, zlib.error) as error:
            # A truncated or corrupt gzip: rows read so far stand, the rest is unreadable.
            yield _RawRow(path, row + 1, None, "unreadable_file", f"{type(error).__name__}: {error}")
            return
        if row == -1:
            yield _RawRow(path, None, None, "empty_file", "the file has no rows")


def _parse_json_line(path: str, row: int, line: bytes) -> _RawRow:
    excerpt = line[:EXCERPT_CHARS].decode("utf-8", errors="replace")
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as error:
        return _RawRow(path, row, None, "invalid_utf8", str(error), excerpt)
    if not decoded.strip():
        return _RawRow(path, row, None, "empty_line", None, excerpt)
    try:
        record = json.loads(decoded)
    except json.JSONDecodeError as error:
        return _RawRow(path, row, None, "malformed_json", str(error), excerpt)
    if not isinstance(record, dict):
        return _RawRow(path, row, None, "not_an_object", type(record).__name__, excerpt)
    return _RawRow(path, row, record)


def _iter_parquet(fs: Any, path: str, text_field: str) -> Iterator[_RawRow]:
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        if text_field not in parquet.schema_arrow.names:
            yield _RawRow(
                path, None, None, "schema_mismatch",
                f"no {text_field!r} column; columns are {parquet.schema_arrow.names}",
            )
            return
        row = 0
        for batch in parquet.iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                yield _RawRow(path, row, record)
                row += 1
        if row == 0:
            yield _RawRow(path, None, None, "empty_file", "the file has no rows")


def _validate(raw: _RawRow, config: IngestConfig) -> _RawRow | tuple[str, dict[str, Any]]:
    """Either a quarantine row, or (normalised text, record)."""
    record = raw.record or {}
    text = record.get(config.text_field)
    raw_excerpt = str(text) if text is not None else json.dumps(record)
    # Excerpts go to Parquet and DuckDB, so they must be valid UTF-8 even when the text is not.
    excerpt = raw_excerpt[:EXCERPT_CHARS].encode("utf-8", "backslashreplace").decode("utf-8")
    if text is None:
        return _RawRow(raw.file, raw.row, None, "missing_text", f"no {config.text_field!r}", excerpt)
    if not isinstance(text, str):
        return _RawRow(
            raw.file, raw.row, None, "wrong_type",
            f"{config.text_field!r} is {type(text).__name__}, expected string", excerpt,
        )
    if "\x00" in text:
        return _RawRow(raw.file, raw.row, None, "nul_bytes", "text contains NUL", excerpt)
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        return _RawRow(raw.file, raw.row, None, "invalid_utf8", "lone surrogate in text", excerpt)
    normalised = normalise_text(text)
    if not normalised:
        return _RawRow(raw.file, raw.row, None, "empty_text", None, excerpt)
    if not has_visible_text(normalised):
        return _RawRow(raw.file, raw.row, None, "empty_text",
                       "no visible characters (only whitespace, zero-width or format characters)",
                       excerpt)
    if len(normalised) < config.min_chars:
        return _RawRow(
            raw.file, raw.row, None, "too_short",
            f"{len(normalised)} chars < min_chars {config.min_chars}", excerpt,
        )
    if len(normalised) > config.max_chars:
        return _RawRow(
            raw.file, raw.row, None, "too_long",
            f"{len(normalised)} chars > max_chars {config.max_chars}", excerpt,
        )
    problem = _metadata_problem(record, config)
    if problem:
        return _RawRow(raw.file, raw.row, None, "bad_field", problem, excerpt)
    return normalised, record


#: longest value of each metadata field a document may carry, in characters
FIELD_MAX_CHARS = {"source": 256, "id": 1024, "url": 4096, "license": 256}


def _metadata_problem(record: dict[str, Any], config: IngestConfig) -> str | None:
    """Why a document's source, id, url or license cannot be stored (a lone surrogate is not
    encodable as UTF-8; a 5 MB source name would flood every table and event), or None."""
    fields = {"source": config.source_field, "id": config.id_field, "url": "url",
              "license": "license"}
    for role, name in fields.items():
        value = record.get(name)
        if value is None:
            continue
        text = str(value)
        if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
            return f"{name!r} has a lone surrogate (not encodable as UTF-8)"
        if len(text) > FIELD_MAX_CHARS[role]:
            return f"{name!r} is {len(text)} chars > {FIELD_MAX_CHARS[role]}"
    return None


def ingest_crawl(
    crawl_url: str,
    config: IngestConfig | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: Any = None,
) -> IngestResult:
    """Read every shard of a crawl into accepted documents and quarantine rows.

    ``progress``, if given, is called as ``progress(file, rows_so_far)`` after each shard.
    """
    config = config or IngestConfig()
    fs, root = fsspec.core.url_to_fs(crawl_url, **(storage_options or {}))
    shards = list_shards(crawl_url, storage_options)
    docs: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    first_seen: dict[str, tuple[str, int | None]] = {}
    rows_read = 0
    for path in shards:
        refusal = shard_refusal(fs, root, path)
        if refusal:  # one row read, as for any whole-file failure
            rows_read += 1
            rejected.append(_quarantine_row(_RawRow(path, None, None, "refused_file", refusal)))
            continue
        if path.endswith(".parquet"):
            rows = _iter_parquet(fs, path, config.text_field)
        else:
            rows = _iter_jsonl(fs, path, max_line_bytes(config))
        for raw in rows:
            # A whole-file failure (schema mismatch, unreadable tail) counts as one row read.
            rows_read += 1
            outcome = raw if raw.reason else _validate(raw, config)
            if isinstance(outcome, _RawRow):
                rejected.append(_quarantine_row(outcome))
                continue
            text, record = outcome
            doc_id = doc_id_of(text)
            if doc_id in first_seen:
                file, row = first_seen[doc_id]
                rejected.append(_quarantine_row(_RawRow(
                    raw.file, raw.row, None, "duplicate", f"{doc_id} first at {file}:{row}",
                    text[:EXCERPT_CHARS],
                )))
                continue
            first_seen[doc_id] = (raw.file, raw.row)
            docs.append({
                "doc_id": doc_id,
                "text": text,
                "source": _str_or_none(record.get(config.source_field)) or "unknown",
                "url": _str_or_none(record.get("url")),
                "license": _str_or_none(record.get("license")),
                "crawl_id": _str_or_none(record.get(config.id_field)),
                "file": raw.file,
                "row": raw.row,
                "n_chars": len(text),
            })
        if progress is not None:
            progress(path, rows_read)
    documents = pl.DataFrame(docs, schema=DOCUMENT_SCHEMA)
    quarantine = pl.DataFrame(rejected, schema=QUARANTINE_SCHEMA)
    return IngestResult(documents, quarantine, rows_read, shards)


DOCUMENT_SCHEMA = {
    "doc_id": pl.String, "text": pl.String, "source": pl.String, "url": pl.String,
    "license": pl.String, "crawl_id": pl.String, "file": pl.String, "row": pl.Int64,
    "n_chars": pl.Int64,
}
QUARANTINE_SCHEMA = {
    "file": pl.String, "row": pl.Int64, "reason": pl.String, "detail": pl.String,
    "excerpt": pl.String,
}


def _quarantine_row(raw: _RawRow) -> dict[str, Any]:
    return {"file": raw.file, "row": raw.row, "reason": raw.reason, "detail": raw.detail,
            "excerpt": raw.excerpt}


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def crawl_inputs(crawl_url: str, storage_options: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(URL, sha256) of every shard of a crawl, what its documents are made from (streamed
    hashes). A refused shard (see `shard_refusal`) is never opened: its hash is ``refused``."""
    fs, root = fsspec.core.url_to_fs(crawl_url, **(storage_options or {}))
    from dsdm.store import file_sha256

    return [(fs.unstrip_protocol(p), "refused" if shard_refusal(fs, root, p) else file_sha256(fs, p))
            for p in list_shards(crawl_url, storage_options)]


def ingest_summary(result: IngestResult) -> dict[str, Any]:
    """The counts that reconcile (rows read = accepted + quarantined + duplicates), documents
    and characters per source, and quarantined rows per reason."""
    per_source = (result.documents.group_by("source")
                  .agg(pl.len().alias("documents"), pl.col("n_chars").sum().alias("chars"))
                  .sort("source"))
    return {
        "rows_read": result.rows_read, "accepted": result.documents.height,
        "quarantined": result.quarantined, "duplicates": result.duplicates,
        "per_source": per_source.to_dicts(),
        "reasons": result.quarantine.group_by("reason").len().sort("reason").to_dicts(),
    }
