"""The prepared directory: what `uft-ray prepare` (uft_ray.data.pipeline.prepare) writes and everything reads.

    DIR/rows/*.parquet        schema.TOKENIZED: the mixture's rows, in name order (the prepared row order)
    DIR/quarantine/*.parquet  schema.QUARANTINE: every rejected row with its reason
    DIR/summary.json          counts per source and reason, the mixture, and the reference service's entry
    DIR/_work/                the data plane's staging area while it runs (removed at the end)

The one owner of these names, of listing the row files, of reading rows and the summary, and of attaching
columns to rows as they stream (`join_columns`). After `prepare` the rows are never rewritten: the reference
log-probs live in their own cache (uft_ray.reference.cache) and are joined into the trainer's feed, so any
number of runs (a sweep over beta or lr) can read one prepared directory at once.
Local paths and URIs alike (uft_ray.storage).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.dataset as pads

from uft_ray import storage

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow.fs as pafs
    import ray.data

ROWS = "rows"
QUARANTINE = "quarantine"
SUMMARY = "summary.json"
WORK = "_work"


def rows_dir(prepared_dir: str) -> str:
    return storage.join(prepared_dir, ROWS)


def quarantine_dir(prepared_dir: str) -> str:
    return storage.join(prepared_dir, QUARANTINE)


def summary_path(prepared_dir: str) -> str:
    return storage.join(prepared_dir, SUMMARY)


def work_dir(prepared_dir: str) -> str:
    return storage.join(prepared_dir, WORK)


def parquet_files(directory: str) -> tuple[pafs.FileSystem, list[str]]:
    """Every `*.parquet` under `directory` in name order, temporaries (dot files) left out."""
    return storage.list_files(directory, ".parquet")


def row_files(prepared_dir: str) -> tuple[pafs.FileSystem, list[str]]:
    """DIR/rows/*.parquet in the prepared row order; a directory without rows is an error naming the fix."""
    fs, files = parquet_files(rows_dir(prepared_dir))
    if not files:
        raise FileNotFoundError(f"{prepared_dir}/rows has no parquet files; run `uft-ray prepare` first")
    return fs, files


def read_rows(prepared_dir: str, columns: list[str] | None = None) -> pa.Table:
    """DIR/rows as one table, in prepared order; `columns` that no file has are left out (e.g. the pair columns
    of an sft-only mixture). For small column subsets: `row_id, source, length` for the plan."""
    fs, files = row_files(prepared_dir)
    ds = pads.dataset(files, filesystem=fs, format="parquet")
    if columns is not None:
        columns = [c for c in columns if c in ds.schema.names]
    return ds.to_table(columns=columns)


def rows_dataset(prepared_dir: str, columns: list[str] | None = None) -> ray.data.Dataset:
    """DIR/rows as a lazy Ray Dataset (the trainer's input)."""
    import ray.data

    fs, files = row_files(prepared_dir)
    ds = ray.data.read_parquet([storage.as_uri(prepared_dir, f) for f in files])
    if columns is not None:
        ds = ds.select_columns([c for c in columns if c in ds.schema().names])
    return ds


def read_summary(prepared_dir: str) -> dict[str, Any]:
    """DIR/summary.json; FileNotFoundError when the directory was never prepared (or not to the end)."""
    summary = storage.read_json(summary_path(prepared_dir))
    if summary is None:
        raise FileNotFoundError(f"{summary_path(prepared_dir)} is missing or unreadable; run `uft-ray prepare`")
    return summary


def write_summary(prepared_dir: str, summary: dict[str, Any]) -> None:
    storage.write_json(summary_path(prepared_dir), summary)


def merge_summary(prepared_dir: str, key: str, entry: Any) -> None:
    """Set `summary[key] = entry`, keeping everything else. Atomic: concurrent runs each leave a whole file."""
    summary = storage.read_json(summary_path(prepared_dir), default={})
    summary[key] = entry
    write_summary(prepared_dir, summary)


def is_prepared(prepared_dir: str) -> bool:
    """Whether `prepare` ran to its end here (it writes summary.json last)."""
    return storage.read_json(summary_path(prepared_dir)) is not None


def reset(prepared_dir: str) -> None:
    """Remove what an earlier `prepare` left (rows, quarantine, staging, summary) before writing anew."""
    import pyarrow.fs as pafs

    fs, base = storage.filesystem_for(prepared_dir)
    fs.create_dir(base, recursive=True)
    for name in (ROWS, QUARANTINE, WORK):
        path = storage.join(base, name)
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)
    summary = storage.join(base, SUMMARY)
    if fs.get_file_info(summary).type == pafs.FileType.File:
        fs.delete_file(summary)


def join_columns(batch: pa.Table, values: dict[str, tuple], fields: list[pa.Field]) -> pa.Table:
    """`batch` with `fields` appended from `values[row_id]` (one tuple per row, in `fields` order).

    The rows stay as prepared; columns computed later (the reference log-probs) are attached as the rows
    stream, e.g. in a `map_batches` stage. Existing columns of the same names are replaced. A row without a
    value is an error naming it: a silent null would train on a wrong target.
    """
    batch = batch.drop_columns([f.name for f in fields if f.name in batch.column_names])
    ids = batch.column("row_id").to_pylist()
    try:
        got = [values[rid] for rid in ids]
    except KeyError as e:
        raise KeyError(f"row {e.args[0]!r} has no {', '.join(f.name for f in fields)} value") from None
    for k, f in enumerate(fields):
        batch = batch.append_column(f, pa.array([v[k] for v in got], f.type))
    return batch
