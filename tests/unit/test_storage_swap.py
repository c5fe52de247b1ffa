"""`storage.copy_tree` and `storage.local_dir` replace a tree without ever leaving none: locally a sibling is written
and swapped in, on object storage (the moto S3 server) new objects are put before stale ones are deleted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from uft_ray import storage


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path: bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _write(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


OLD = {"adapter_config.json": b'{"old": 1}', "adapter_model.safetensors": b"old weights", "stale/extra.txt": b"x"}
NEW = {"adapter_config.json": b'{"new": 1}', "adapter_model.safetensors": b"new weights", "tokenizer.json": b"{}"}


def _broken_source(root: Path) -> Path:
    """A source whose copy fails part way, also as root: a dangling symlink among good files."""
    _write(root, NEW)
    os.symlink(root / "no-such-file", root / "zz_dangling.bin")
    return root


def _beside(dst: Path) -> list[str]:
    return sorted(p.name for p in dst.parent.iterdir() if p.name != dst.name)


# --- local ----------------------------------------------------------------------------------------------------


def test_an_error_inside_local_dir_leaves_the_old_tree_and_no_temporary(tmp_path: Path) -> None:
    dst = _write(tmp_path / "run" / "adapter", OLD)
    with pytest.raises(RuntimeError, match="save failed"), storage.local_dir(str(dst)) as out:
        Path(out, "adapter_config.json").write_bytes(b"half")
        raise RuntimeError("save failed")
    assert _tree(dst) == OLD
    assert _beside(dst) == []


def test_local_dir_replaces_the_tree_when_the_block_succeeds(tmp_path: Path) -> None:
    dst = _write(tmp_path / "run" / "adapter", OLD)
    with storage.local_dir(str(dst)) as out:
        assert os.listdir(out) == []  # the writer starts from an empty directory
        _write(Path(out), NEW)
        assert _tree(dst) == OLD  # the old tree stays until the block is done
    assert _tree(dst) == NEW
    assert _beside(dst) == []


def test_copy_tree_that_fails_part_way_leaves_the_old_destination(tmp_path: Path) -> None:
    src = _broken_source(tmp_path / "src")
    dst = _write(tmp_path / "run" / "adapter", OLD)
    with pytest.raises(OSError):
        storage.copy_tree(str(src), str(dst))
    assert _tree(dst) == OLD
    assert _beside(dst) == []


def test_copy_tree_from_a_missing_source_leaves_the_old_destination(tmp_path: Path) -> None:
    dst = _write(tmp_path / "adapter", OLD)
    with pytest.raises(OSError):
        storage.copy_tree(str(tmp_path / "nowhere"), str(dst))
    assert _tree(dst) == OLD


def test_copy_tree_replaces_stale_files(tmp_path: Path) -> None:
    src = _write(tmp_path / "src", NEW)
    dst = _write(tmp_path / "run" / "adapter", OLD)
    storage.copy_tree(str(src), str(dst))
    assert _tree(dst) == NEW
    assert _beside(dst) == []
    storage.copy_tree(str(src), str(tmp_path / "fresh" / "deep"))  # a destination whose parents do not exist
    assert _tree(tmp_path / "fresh" / "deep") == NEW


# --- object storage ---------------------------------------------------------------------------------------------


def _objects(uri: str) -> dict[str, bytes]:
    fs, files = storage.list_files(uri)
    base = storage.filesystem_for(uri)[1].rstrip("/") + "/"
    return {f[len(base) :]: storage.read_bytes(storage.as_uri(uri, f)) for f in files}


def test_copy_tree_to_a_bucket_puts_the_new_tree_and_deletes_stale_objects(tmp_path: Path, s3_bucket: str) -> None:
    dst = f"{s3_bucket}/run/adapter"
    storage.copy_tree(str(_write(tmp_path / "old", OLD)), dst)
    assert _objects(dst) == OLD
    storage.copy_tree(str(_write(tmp_path / "new", NEW)), dst)
    assert _objects(dst) == NEW
    local = tmp_path / "back"
    storage.copy_tree(dst, str(local))  # and down again
    assert _tree(local) == NEW
    storage.copy_tree(dst, f"{s3_bucket}/copy")  # and within the bucket
    assert _objects(f"{s3_bucket}/copy") == NEW


def test_copy_tree_to_a_bucket_that_fails_part_way_deletes_nothing(tmp_path: Path, s3_bucket: str) -> None:
    dst = f"{s3_bucket}/adapter"
    storage.copy_tree(str(_write(tmp_path / "old", OLD)), dst)
    with pytest.raises(OSError):
        storage.copy_tree(str(_broken_source(tmp_path / "src")), dst)
    left = _objects(dst)
    assert left["stale/extra.txt"] == b"x"  # no deletion before every new object is in
    # the old completion file went first and the new one goes last: a mixed tree never reads as complete
    assert "adapter_config.json" not in left


def test_an_error_inside_local_dir_of_a_bucket_leaves_the_old_objects(s3_bucket: str, tmp_path: Path) -> None:
    dst = f"{s3_bucket}/adapter"
    storage.copy_tree(str(_write(tmp_path / "old", OLD)), dst)
    with pytest.raises(RuntimeError, match="save failed"), storage.local_dir(dst) as out:
        _write(Path(out), NEW)
        raise RuntimeError("save failed")
    assert _objects(dst) == OLD
    with storage.local_dir(dst) as out:
        _write(Path(out), NEW)
    assert _objects(dst) == NEW
