"""Target tasks: prompt/continuation pairs whose loss selection tries to reduce.

A task is one file ``<tasks_root>/<name>.jsonl[.gz]`` with rows ``id, task, split, prompt,
continuation``. The ``select`` split drives selection; the ``eval`` split only measures it.
Only continuation tokens count in the loss.
"""

import gzip
import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

import fsspec
import polars as pl
import pyarrow as pa
from tokenizers import Tokenizer

from dsdm.ingest import has_visible_text
from dsdm.tokenization import encode_prompt_continuation, examples_table

SPLITS = ("select", "eval")
REQUIRED_FIELDS = ("id", "split", "prompt", "continuation")


class TaskFileError(ValueError):
    """A task file is missing or has a bad row; the message names file, row and reason."""


#: a task name is a file stem under the tasks root, never a path
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_task_name(name: str) -> str:
    """`name` if it is a plain task name (1-64 letters, digits, '.', '_', '-', no '..');
    otherwise a TaskFileError, so a name cannot read a file outside the tasks root."""
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name) or ".." in name:
        raise TaskFileError(f"task name {name!r} is not a name: use 1-64 letters, digits, '.', "
                            "'_' or '-', starting with a letter or digit (no '/' or '..')")
    return name


def _task_path(fs: Any, root: str, name: str) -> str:
    validate_task_name(name)
    for suffix in (".jsonl.gz", ".jsonl"):
        if fs.exists(f"{root}/{name}{suffix}"):
            return f"{root}/{name}{suffix}"
    available = sorted(
        p.rsplit("/", 1)[-1].split(".")[0] for p in fs.glob(f"{root}/*.jsonl*")
    )
    raise TaskFileError(f"task {name!r} not found in {root}; available: {available}")


def read_tasks(
    tasks_url: str, names: Sequence[str], storage_options: dict[str, Any] | None = None
) -> pl.DataFrame:
    """All rows of the named tasks (columns: id, task, split, prompt, continuation, file, row).

    Target rows are curated, so a bad row is an error (file, row, reason), not quarantine.
    """
    if not names:
        raise TaskFileError("no target tasks configured")
    fs, root = fsspec.core.url_to_fs(tasks_url, **(storage_options or {}))
    root = root.rstrip("/")
    rows: list[dict[str, Any]] = []
    for name in names:
        path = _task_path(fs, root, name)
        with fs.open(path, "rb") as raw:
            stream = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
            for row, line in enumerate(stream):
                rows.append(_parse_task_row(path, row, line, name))
        if not any(r["task"] == name for r in rows):
            raise TaskFileError(f"{path}: task file is empty")
    frame = pl.DataFrame(rows)
    duplicated = frame.filter(pl.col("id").is_duplicated())
    if duplicated.height:
        first = duplicated.row(0, named=True)
        raise TaskFileError(f"{first['file']} row {first['row']}: duplicate id {first['id']!r}")
    for name in names:
        splits = set(frame.filter(pl.col("task") == name)["split"].to_list())
        if missing := [s for s in SPLITS if s not in splits]:
            raise TaskFileError(f"task {name!r} has no rows in split(s) {missing}")
    return frame


def _parse_task_row(path: str, row: int, line: bytes, name: str) -> dict[str, Any]:
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TaskFileError(f"{path} row {row}: not a UTF-8 JSON line ({error})") from error
    if not isinstance(record, dict):
        raise TaskFileError(f"{path} row {row}: expected a JSON object")
    for key in REQUIRED_FIELDS:
        if not isinstance(record.get(key), str) or not record[key]:
            raise TaskFileError(f"{path} row {row}: field {key!r} missing or not a non-empty string")
        if any(0xD800 <= ord(c) <= 0xDFFF for c in record[key]):
            raise TaskFileError(f"{path} row {row}: field {key!r} has a lone surrogate "
                                "(not encodable as UTF-8)")
        if key in ("prompt", "continuation") and not has_visible_text(record[key]):
            raise TaskFileError(f"{path} row {row}: field {key!r} has no visible characters "
                                "(only whitespace, zero-width or format characters)")
    if record["split"] not in SPLITS:
        raise TaskFileError(f"{path} row {row}: split {record['split']!r} not in {SPLITS}")
    if record.get("task", name) != name:
        raise TaskFileError(f"{path} row {row}: task {record['task']!r} in the file of {name!r}")
    return {"id": record["id"], "task": name, "split": record["split"],
            "prompt": record["prompt"], "continuation": record["continuation"],
            "file": path, "row": row}


def tokenize_tasks(
    tokenizer: Tokenizer, tasks: pl.DataFrame, seq_len: int
) -> tuple[pa.Table, dict[str, int]]:
    """Examples table (+ ``task`` and ``split`` columns) and truncation counts."""
    padded, n_tokens, score_from, truncated = encode_prompt_continuation(
        tokenizer, tasks["prompt"].to_list(), tasks["continuation"].to_list(), seq_len
    )
    table = examples_table(
        tasks["id"].to_list(), tasks["id"].to_list(), tasks["task"].to_list(),
        padded, n_tokens, score_from,
    )
    table = table.append_column("task", pa.array(tasks["task"].to_list(), pa.string()))
    table = table.append_column("split", pa.array(tasks["split"].to_list(), pa.string()))
    return table, truncated


def tasks_input(tasks_url: str, names: Sequence[str], tasks: pl.DataFrame) -> tuple[str, str]:
    """(name, sha256) of the target rows as an input: the tasks' location and names, and a
    hash of every row's id, prompt, continuation and split."""
    digest = hashlib.sha256(
        tasks.select("id", "prompt", "continuation", "split").write_ipc(None).getvalue()
    ).hexdigest()
    return f"{tasks_url}#{','.join(names)}", digest


def task_counts(table: pa.Table) -> pl.DataFrame:
    """Examples and mean scored (continuation) tokens per task and split, of a
    `tokenize_tasks` table."""
    frame = pl.from_arrow(table.select(["task", "split", "n_tokens", "score_from"]))
    return (frame.group_by("task", "split")
            .agg(pl.len().alias("examples"),
                 (pl.col("n_tokens") - pl.col("score_from")).mean().alias("scored_tokens_mean"))
            .sort("task", "split"))


def select_texts(tokenizer: Tokenizer, targets: pa.Table, tasks: Sequence[str] = ()) -> list[str]:
    """Decoded prompt + continuation of the select-split targets of ``tasks`` (all when
    empty), from a `tokenize_tasks` table; a ValueError naming tasks it does not hold."""
    table = pl.from_arrow(targets)
    known = sorted(set(table["task"].to_list()))
    if unknown := sorted(set(tasks) - set(known)):
        raise ValueError(f"tasks {unknown} are not among the target tasks {known}")
    chosen = table.filter((pl.col("split") == "select") & pl.col("task").is_in(list(tasks) or known))
    return tokenizer.decode_batch([row[:n] for row, n in zip(
        chosen["input_ids"].to_list(), chosen["n_tokens"].to_list(), strict=True)])
