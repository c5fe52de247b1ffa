"""What is written is whole: a write to object storage (the moto S3 server) that fails part way leaves nothing under
its final name; an adapter re-uploaded over another is never readable as complete while mixed; locally a killed
swap never leaves the directory missing, and stray temporaries beside it are cleaned."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from uft_ray import storage

OLD = {"adapter_config.json": b'{"old": 1}', "adapter_model.safetensors": b"old weights", "tokenizer.json": b"old"}
NEW = {"adapter_config.json": b'{"new": 1}', "adapter_model.safetensors": b"new weights", "tokenizer.json": b"new"}


def _write(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def _keys(bucket: str) -> list[str]:
    fs, files = storage.list_files(bucket)
    import pyarrow.fs as pafs

    base = storage.filesystem_for(bucket)[1].rstrip("/") + "/"
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return sorted(i.path[len(base) :] for i in infos if i.type == pafs.FileType.File)


class _Boom(RuntimeError):
    pass


def _half_then_raise(out) -> None:
    out.write(b"P" * (6 << 20))  # past pyarrow's first upload part
    raise _Boom("the writer failed part way")


def test_a_writer_that_raises_leaves_no_object_under_the_final_name(s3_bucket: str) -> None:
    uri = f"{s3_bucket}/run/plan.parquet"
    with pytest.raises(_Boom):
        storage.atomic_write(uri, _half_then_raise)
    assert not storage.exists(uri)
    assert _keys(s3_bucket) == []  # no temporary left either


def test_a_writer_that_raises_leaves_the_old_object_whole(s3_bucket: str) -> None:
    uri = f"{s3_bucket}/run/quarantine/part-0.parquet"
    storage.atomic_write(uri, b"old part")
    with pytest.raises(_Boom):
        storage.atomic_write(uri, _half_then_raise)
    assert storage.read_bytes(uri) == b"old part"
    assert _keys(s3_bucket) == ["run/quarantine/part-0.parquet"]
    storage.atomic_write(uri, lambda out: out.write(b"new part"))
    assert storage.read_bytes(uri) == b"new part"


def test_an_adapter_reuploaded_over_another_is_never_complete_while_mixed(tmp_path: Path, s3_bucket: str) -> None:
    dst = f"{s3_bucket}/run/adapter"
    storage.copy_tree(str(_write(tmp_path / "old", OLD)), dst)
    src = _write(tmp_path / "new", NEW)
    os.symlink(src / "no-such-file", src / "zz_dangling.bin")  # the upload fails part way
    with pytest.raises(OSError):
        storage.copy_tree(str(src), dst)
    left = {k: storage.read_bytes(f"{dst}/{k}") for k in _keys(f"{s3_bucket}/run/adapter")}
    mixed = {k for k, v in left.items() if k in OLD and v != OLD[k]}
    assert mixed, "the failure came after some new objects: the tree is mixed"
    assert "adapter_config.json" not in left  # so nothing reads it as a complete adapter
    (src / "zz_dangling.bin").unlink()
    storage.copy_tree(str(src), dst)
    assert {k: storage.read_bytes(f"{dst}/{k}") for k in NEW} == NEW


_KILLED_SWAP = """
import os, sys
from uft_ray import storage
real, calls = os.rename, []
def rename(a, b):
    calls.append(a)
    if len(calls) == 2:  # the process dies between moving the old tree aside and moving the new one in
        os._exit(9)
    real(a, b)
os.rename = rename
with storage.local_dir(sys.argv[1]) as out:
    open(os.path.join(out, "adapter_config.json"), "w").write("new")
"""


def test_a_swap_killed_part_way_never_loses_the_directory(tmp_path: Path) -> None:
    adapter = _write(tmp_path / "run" / "adapter", {"adapter_config.json": b"old"})
    r = subprocess.run([sys.executable, "-c", _KILLED_SWAP, str(adapter)], capture_output=True, timeout=120)
    assert r.returncode in (0, 9), r.stderr
    assert (adapter / "adapter_config.json").read_bytes() in (b"old", b"new")


def test_a_missing_directory_comes_back_from_its_old_sibling_and_strays_are_cleaned(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write(
        run / ".adapter.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.old", {"adapter_config.json": b"old"}
    )  # a crash between the two renames
    _write(run / ".adapter.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.tmp", {"adapter_config.json": b"half"})
    storage.settle(str(run / "adapter"))
    assert (run / "adapter" / "adapter_config.json").read_bytes() == b"old"
    assert sorted(p.name for p in run.iterdir()) == ["adapter"]
    # a temporary another writer is still filling (it holds its lock) is left alone
    busy = _write(run / ".adapter.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb.tmp", {"x": b"1"})
    fd = os.open(busy, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _write(run / ".adapter.cccccccccccccccccccccccccccccccc.old", {"x": b"2"})
        with storage.local_dir(str(run / "adapter")) as out:
            _write(Path(out), {"adapter_config.json": b"new"})
        assert sorted(p.name for p in run.iterdir()) == [".adapter.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb.tmp", "adapter"]
        assert (run / "adapter" / "adapter_config.json").read_bytes() == b"new"
    finally:
        os.close(fd)
