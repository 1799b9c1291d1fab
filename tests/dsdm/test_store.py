"""Artifact store: atomic writes, relative paths only, stable fingerprints."""

import os
from pathlib import Path

import pyarrow as pa
import pytest

from dsdm.store import ArtifactStore, fingerprint


def test_write_read_roundtrip_and_sha(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "root"))
    stored = store.write_bytes("a/b/c.bin", b"hello")
    assert stored.uri == f"file://{tmp_path}/root/a/b/c.bin"
    assert stored.sha256 == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert store.read_bytes("a/b/c.bin") == b"hello"
    table = pa.table({"x": [1, 2, 3]})
    store.write_parquet("t/x.parquet", table)
    assert store.read_parquet("t/x.parquet").equals(table)
    assert store.list("a") == ["a/b/c.bin"]


def test_failed_write_leaves_neither_final_nor_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ArtifactStore(str(tmp_path))
    store.write_bytes("x.bin", b"old")

    def crash(src: str, dst: str) -> None:
        raise OSError("disk vanished")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk vanished"):
        store.write_bytes("x.bin", b"new")
    with pytest.raises(OSError):
        store.write_bytes("y.bin", b"new")
    monkeypatch.undo()
    assert store.read_bytes("x.bin") == b"old"
    assert not store.exists("y.bin")
    assert sorted(os.listdir(tmp_path)) == ["x.bin"]


def test_paths_must_stay_below_the_root(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    for bad in ("/etc/passwd", "../escape", "a/../../b"):
        with pytest.raises(ValueError, match="below the root"):
            store.write_bytes(bad, b"x")


def test_fingerprint_is_stable_and_order_insensitive_for_dict_keys() -> None:
    assert fingerprint({"a": 1, "b": 2}, "x") == fingerprint({"b": 2, "a": 1}, "x")
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert len(fingerprint("anything")) == 16


def test_remove_folder_deletes_only_that_folder(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path))
    for name in ("_steps/run-a/plan/out.json", "_steps/run-a/shard/0.json",
                 "_steps/run-b/plan/out.json"):
        store.write_bytes(name, b"{}")
    assert store.remove_folder("_steps/run-a") == 2
    assert store.list("_steps") == ["_steps/run-b/plan/out.json"]
    assert store.remove_folder("_steps/run-a") == 0
    with pytest.raises(ValueError, match="stay below the root"):
        store.remove_folder("../elsewhere")
