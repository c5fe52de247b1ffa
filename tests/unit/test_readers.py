"""Readers (no Ray): paths (file, dir, glob, URI), each file type, bad lines, unreadable files, each sample layout."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from uft_ray.config import SourceConfig
from uft_ray.data import quarantine as q
from uft_ray.data.pipeline import iter_part
from uft_ray.data.quarantine import Quarantined
from uft_ray.data.sources import (
    SourceError,
    file_type,
    iter_jsonl,
    iter_records,
    list_files,
    plan_parts,
)
from uft_ray.storage import filesystem_for


def write_jsonl(path: Path, lines: list[str], gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def test_file_types() -> None:
    assert file_type("a/train.jsonl.gz") == ("jsonl", "gzip")
    assert file_type("x.JSON") == ("jsonl", None)
    assert file_type("d/train-00000-of-00001.parquet") == ("parquet", None)
    assert file_type("x.jsonl.zst") == ("jsonl", "zstd")
    assert file_type("README.md") is None and file_type("x.parquet.gz") is None


def test_file_dir_and_glob(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "d" / "a.jsonl", ['{"x": 1}'])
    b = write_jsonl(tmp_path / "d" / "sub" / "b.jsonl.gz", ['{"x": 2}'], gz=True)
    write_jsonl(tmp_path / "d" / ".hidden" / "c.jsonl", ['{"x": 3}'])
    write_jsonl(tmp_path / "d" / "_tmp.jsonl", ['{"x": 4}'])
    (tmp_path / "d" / "README.md").write_text("not data")

    assert list_files(str(a)) == ([str(a)], str(tmp_path / "d"))
    files, root = list_files(str(tmp_path / "d"))  # recursive; hidden, _-prefixed and non-data files skipped
    assert files == [str(a), str(b)] and root == str(tmp_path / "d")
    assert list_files(str(tmp_path / "d" / "*.jsonl"))[0] == [str(tmp_path / "d" / "_tmp.jsonl"), str(a)]
    assert list_files(str(tmp_path / "d" / "**" / "*.jsonl.gz"))[0] == [str(b)]
    assert [p.relpath for p in plan_parts(str(tmp_path / "d"))] == ["a.jsonl", "sub/b.jsonl.gz"]
    assert [p.relpath for p in plan_parts(str(a))] == ["a.jsonl"]


@pytest.mark.parametrize("name", ["missing.jsonl", "missing/*.parquet", "missing_dir"])
def test_missing_paths_name_the_path(tmp_path: Path, name: str) -> None:
    with pytest.raises(SourceError, match=str(tmp_path / name).replace("*", r"\*")):
        list_files(str(tmp_path / name))


def test_unknown_file_type_and_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(SourceError, match=r"data.csv: unknown file type; expected .parquet"):
        list_files(str(tmp_path / "data.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no data files"):
        list_files(str(tmp_path / "empty"))


def test_uri_filesystems_resolve_without_network() -> None:
    fs, path = filesystem_for("gs://bucket/dir/train.parquet")
    assert isinstance(fs, pafs.GcsFileSystem) and path == "bucket/dir/train.parquet"
    fs, path = filesystem_for("hf://datasets/nvidia/HelpSteer2/train.jsonl.gz")  # fsspec (huggingface_hub)
    assert isinstance(fs, pafs.PyFileSystem) and path == "datasets/nvidia/HelpSteer2/train.jsonl.gz"
    fs, path = filesystem_for("file:///tmp/x.jsonl")
    assert isinstance(fs, pafs.LocalFileSystem) and path == "/tmp/x.jsonl"


def test_a_uri_source_lists_and_reads_through_fsspec() -> None:
    # fsspec's in-memory filesystem stands in for s3:// / hf://: the same listing, glob and reading code path
    mem = fsspec.filesystem("memory")
    with mem.open("/uft-test/data/a.jsonl", "wb") as f:
        f.write(b'{"x": 1}\n')
    with mem.open("/uft-test/data/sub/b.jsonl.gz", "wb") as f:
        f.write(gzip.compress(b'{"x": 2}\n{"x": 3}\n'))
    try:
        files, _ = list_files("memory://uft-test/data")
        assert files == ["memory:///uft-test/data/a.jsonl", "memory:///uft-test/data/sub/b.jsonl.gz"]
        assert list_files("memory://uft-test/data/**/*.gz")[0] == ["memory:///uft-test/data/sub/b.jsonl.gz"]
        parts = plan_parts("memory://uft-test/data")
        assert [p.relpath for p in parts] == ["a.jsonl", "sub/b.jsonl.gz"]
        assert [r.value for p in parts for r in iter_records(p)] == [{"x": 1}, {"x": 2}, {"x": 3}]
    finally:
        mem.rm("/uft-test", recursive=True)


def test_jsonl_bad_lines_cost_one_row(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": \n   \n\xff\xfe{}\n{"a": 2}\r\n[1, 2]')  # no final newline
    recs = list(iter_jsonl(str(path)))
    assert [(r.pos, r.kind, r.value) for r in recs] == [
        (1, "ok", {"a": 1}), (3, q.JSON_PARSE_ERROR, None), (5, q.JSON_PARSE_ERROR, None), (6, "ok", {"a": 2}),
        (7, "ok", [1, 2]),
    ]  # fmt: skip
    assert recs[1].raw() == '{"a": ' and "invalid JSON" in recs[1].error
    assert "not UTF-8" in recs[2].error


def test_gzip_jsonl_and_truncated_gzip(tmp_path: Path) -> None:
    lines = [json.dumps({"i": i, "pad": "x" * 200}) for i in range(2000)]
    good = write_jsonl(tmp_path / "good.jsonl.gz", lines, gz=True)
    assert [r.value["i"] for r in iter_jsonl(str(good), "gzip")] == list(range(2000))
    data = good.read_bytes()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])  # a truncated download
    recs = list(iter_jsonl(str(cut), "gzip"))
    assert recs[-1].kind == q.UNREADABLE_FILE and str(cut) in recs[-1].error
    assert all(r.kind == "ok" for r in recs[:-1]) and len(recs) > 10  # what was read before the break is kept


def test_a_file_that_cannot_be_read_at_all_names_the_file(tmp_path: Path) -> None:
    fake = tmp_path / "not_gzip.jsonl.gz"
    fake.write_text('{"a": 1}\n')
    with pytest.raises(SourceError, match=f"cannot read {fake}"):
        list(iter_jsonl(str(fake), "gzip"))
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SourceError, match=f"cannot read parquet file {corrupt}"):
        plan_parts(str(corrupt))  # footers are read on the driver: fails before any Ray work
    with pytest.raises(SourceError, match="does not exist"):
        plan_parts(str(tmp_path / "gone.jsonl"))


def test_parquet_rows_in_order_and_split_by_row_groups(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    table = pa.table({"prompt_id": [f"p{i}" for i in range(100)], "n": list(range(100))})
    pq.write_table(table, path, row_group_size=10)
    whole = plan_parts(str(path), split_parquet=False)
    assert len(whole) == 1 and whole[0].num_rows == 100
    parts = plan_parts(str(path), rows_per_part=25)
    assert [(p.first_row, p.num_rows) for p in parts] == [(0, 30), (30, 30), (60, 30), (90, 10)]
    recs = [r for p in parts for r in iter_records(p)]
    assert [r.pos for r in recs] == list(range(100))  # positions continue across parts
    assert [r.value["n"] for r in recs] == list(range(100))
    assert json.loads(recs[5].raw()) == {"prompt_id": "p5", "n": 5}


# --- each reader on its sample layout --------------------------------------------------------------------

LAYOUTS = [
    # (sample path key, format, kind, reasons allowed in these good samples)
    ("ultrachat_200k_train", "ultrachat_200k", None, set()),
    ("ultrachat_raw", "ultrachat_raw", None, set()),
    ("helpsteer2_train", "helpsteer2", "score", set()),
    ("helpsteer2_train", "helpsteer2", "binary", {q.TIE}),
    ("helpsteer2_train", "helpsteer2", "pair", {q.TIE}),
    ("helpsteer2_preference", "helpsteer2_preference", None, {q.ZERO_PREFERENCE}),
    ("trl_messages", "messages", None, set()),
    ("trl_prompt_completion", "prompt_completion", None, set()),
    ("trl_unpaired", "unpaired", None, set()),
    ("trl_preference", "preference", None, set()),
    ("trl_scored", "scored", None, set()),
]


@pytest.mark.parametrize(("key", "fmt", "kind", "allowed"), LAYOUTS)
def test_each_reader_on_its_sample_layout(
    tiny_assets: dict, key: str, fmt: str, kind: str | None, allowed: set
) -> None:
    source = SourceConfig(name="s", format=fmt, path=tiny_assets[key], kind=kind)
    rows, bad, read = [], [], 0
    for part in plan_parts(source.path):
        for outs, counted in iter_part(source, part):
            read += counted
            for o in outs:
                (bad if isinstance(o, Quarantined) else rows).append(o)
    stamp = json.loads(Path(tiny_assets["samples"], "uft_samples.json").read_text())["rows"]
    files = list_files(source.path)[0]
    assert read == sum(stamp[os.path.relpath(f, tiny_assets["samples"])] for f in files)
    assert {b.reason for b in bad} <= allowed
    assert rows and {r["kind"] for r in rows} == {source.resolved_kind}
    assert len({r["row_id"] for r in rows}) == len(rows)
    if fmt in ("ultrachat_200k", "ultrachat_raw", "messages"):
        assert len(rows) > read  # unfolded: multi-turn conversations give several rows
    if kind == "binary":
        assert len(rows) + len(bad) == read and sorted({r["score"] for r in rows}) == [0.0, 1.0]
    if kind == "pair" or fmt in ("preference", "helpsteer2_preference"):
        assert all(r["rejected"] for r in rows)
    for r in rows:
        assert r["prompt"][-1]["role"] == "user" and r["response"].strip() and 0.0 <= r["score"] <= 1.0


def test_quarantine_writes_are_idempotent_under_task_retries(tmp_path: Path) -> None:
    """A read task run twice (Ray retries a failed or lost task) rewrites the same quarantine file."""
    from uft_ray.data.mixture import RANK_SPACE
    from uft_ray.data.pipeline import read_part

    path = write_jsonl(tmp_path / "hs.jsonl", ['{"prompt": "p", "response": "r"}', "{broken", '{"prompt": ""}'])
    source = SourceConfig(name="hs", format="helpsteer2", path=str(path))
    (part,) = plan_parts(str(path))
    qdir = str(tmp_path / "quarantine")
    snapshots = []
    for _ in range(2):
        stats = list(read_part(source, 0, part, 0, "stats", (0, RANK_SPACE), qdir))
        assert stats[-1].to_pylist() == [
            {"source": "hs", "part": 0, "rows_read": 3, "normalized": 0, "quarantined": 3}
        ]
        snapshots.append({f.name: f.read_bytes() for f in sorted(Path(qdir).iterdir())})
    assert snapshots[0] == snapshots[1] and len(snapshots[0]) == 1
    reasons = q.read_quarantine(qdir).column("reason").to_pylist()
    assert sorted(reasons) == [q.JSON_PARSE_ERROR, q.MISSING_FIELD, q.MISSING_FIELD]
