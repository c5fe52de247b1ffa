"""The reference cache: `{reference.cache_dir}/ref_logp/{fingerprint}/` (docs/internals.md "Reference cache").

    {cache_dir}/ref_logp/{fingerprint}/part-00000-{writer}.parquet ...   schema.REFERENCE, each row_id once
    {cache_dir}/ref_logp/{fingerprint}/manifest.json    written last: rows, files, fingerprint inputs
    {cache_dir}/ref_logp/file-hashes.json                sha256 memo of the fingerprint (fingerprint.py)

`cache_dir` is a local directory or an object-store URI (s3://, gs://): one code path through uft_ray.storage.
Object stores have no rename, so a cache is published the way that works on both: the writer puts its parts
under names of its own (`-{writer}` suffix), then the manifest naming them, last, in one atomic write (a put;
locally a rename of a temporary file). A reader trusts only a complete manifest: one naming this fingerprint,
every listed file present with its listed row count, and the row ids exactly the expected ones; anything else
is a miss and is replaced. Concurrent publishers of one fingerprint (the runs of a sweep) keep the first
complete one; parts no manifest lists (a killed writer's, a replaced cache's) are removed once they are an hour
old, never sooner, so a live writer's parts are not pulled from under it.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from uft_ray import schema, storage
from uft_ray.config import Config
from uft_ray.reference.fingerprint import CACHE_VERSION

MANIFEST = "manifest.json"
HASH_MEMO = "file-hashes.json"
DEFAULT_ROWS_PER_FILE = 100_000
STALE_PART_S = 3600.0  # a live writer finishes far sooner; older unlisted parts are leftovers


def cache_root(cfg: Config) -> str:
    """`{reference.cache_dir}/ref_logp`: a URI as given, or a local path with `~` expanded."""
    d = cfg.reference.cache_dir
    return storage.join(d if storage.is_remote(d) else os.path.abspath(os.path.expanduser(d)), "ref_logp")


def _name(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def load_cache(directory: str | os.PathLike, expected_ids: Iterable[str]) -> tuple[pa.Table | None, str]:
    """Read a published cache directory, or return (None, why) when it cannot be trusted.

    Trusted means: a manifest naming this fingerprint, every listed file present with its listed row count,
    and the row ids exactly the expected set, each once.
    """
    directory = os.fspath(directory)
    fs, base = storage.filesystem_for(directory)
    if not storage.is_dir(directory):
        return None, "absent"
    if not storage.is_file(storage.join(directory, MANIFEST)):
        return None, "no manifest (an interrupted write)"
    manifest = storage.read_json(storage.join(directory, MANIFEST))
    if not isinstance(manifest, dict):
        return None, "unreadable manifest"
    if manifest.get("fingerprint") != _name(directory) or manifest.get("version") != CACHE_VERSION:
        return None, "manifest of another fingerprint or version"
    tables = []
    for entry in manifest.get("files", []):
        f = storage.join(base, entry["name"])
        try:
            with fs.open_input_file(f) as handle:
                pf = pq.ParquetFile(handle)
                if pf.metadata.num_rows != entry["rows"]:
                    return None, f"{entry['name']} does not hold its {entry['rows']} rows"
                tables.append(pf.read().select(schema.REFERENCE.names).cast(schema.REFERENCE))
        except FileNotFoundError:
            return None, f"listed file {entry['name']} is missing"
        except (OSError, pa.ArrowException, KeyError) as e:
            if not storage.is_file(storage.as_uri(directory, f)):
                return None, f"listed file {entry['name']} is missing"
            return None, f"{entry['name']} is unreadable: {e}"
    table = pa.concat_tables(tables) if tables else schema.REFERENCE.empty_table()
    expected = set(expected_ids)
    ids = table.column("row_id").to_pylist()
    if table.num_rows != manifest.get("rows") or len(ids) != len(expected) or set(ids) != expected:
        return None, f"rows do not match: cache {table.num_rows}, expected {len(expected)}"
    if table.column(schema.REF_LOGP).null_count:
        return None, "ref_logp has nulls"
    if bad := nonfinite_values(table):
        return None, f"values that are not numbers: {bad}"
    return table, "ok"


def nonfinite_values(table: pa.Table, show: int = 3) -> str:
    """'' when every reference value is a finite number (a null rejected side is fine), else which are not: a
    NaN or infinite reference log-prob would make the policy's loss NaN for good once trained on."""
    import pyarrow.compute as pc

    out = []
    for name in (schema.REF_LOGP, schema.REF_LOGP_REJECTED):
        if name not in table.column_names:
            continue
        values = table.column(name)
        bad = pc.invert(pc.is_finite(values)).fill_null(False)
        n = pc.sum(bad).as_py() or 0
        if n:
            rows = table.filter(bad).slice(0, show)
            shown = ", ".join(f"{r} = {v}" for r, v in zip(rows["row_id"].to_pylist(), rows[name].to_pylist(),
                                                            strict=True))  # fmt: skip
            out.append(f"{name} of {n} rows ({shown}{', ...' if n > show else ''})")
    return "; ".join(out)


def write_cache(
    root: str | os.PathLike,
    fp: str,
    table: pa.Table,
    inputs: dict[str, Any],
    *,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
    extra: dict[str, Any] | None = None,
) -> str:
    """Publish `table` (schema.REFERENCE, one row per row_id) as `root/fp`: parts first, the manifest last.

    A trusted cache already there (an identical run published first) is kept and ours is not written.
    """
    final = storage.join(os.fspath(root), fp)
    if bad := nonfinite_values(table):  # never published: every run of this fingerprint would train on it
        raise ValueError(f"reference log-probs for {final}: {bad} are not numbers; nothing was written")
    ids = table.column("row_id").to_pylist()
    if load_cache(final, ids)[0] is not None:
        return final
    fs, base = storage.filesystem_for(final)
    fs.create_dir(base, recursive=True)
    writer = uuid.uuid4().hex[:12]
    table = table.select(schema.REFERENCE.names).cast(schema.REFERENCE)
    files = []
    for k, start in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
        part = table.slice(start, rows_per_file)
        name = f"part-{k:05d}-{writer}.parquet"
        storage.atomic_write(storage.join(final, name), lambda out, part=part: pq.write_table(part, out))
        files.append({"name": name, "rows": part.num_rows, "bytes": fs.get_file_info(storage.join(base, name)).size})
    manifest = {
        "version": CACHE_VERSION,
        "fingerprint": fp,
        "rows": table.num_rows,
        "files": files,
        "writer": writer,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": inputs,
        **(extra or {}),
    }
    if load_cache(final, ids)[0] is not None:  # a racer published while we scored or wrote: keep theirs
        for f in files:
            with contextlib.suppress(OSError):
                fs.delete_file(storage.join(base, f["name"]))
        return final
    storage.write_json(storage.join(final, MANIFEST), manifest, sort_keys=True)  # last: what readers trust
    _remove_stale_parts(final, {f["name"] for f in files})
    return final


def _remove_stale_parts(directory: str, listed: set[str], max_age_s: float = STALE_PART_S) -> None:
    import pyarrow.fs as pafs

    fs, base = storage.filesystem_for(directory)
    now = time.time()
    for info in fs.get_file_info(pafs.FileSelector(base)):
        name = _name(info.path)
        if info.type != pafs.FileType.File or name == MANIFEST or name in listed or not name.endswith(".parquet"):
            continue
        if info.mtime is not None and now - info.mtime.timestamp() > max_age_s:
            with contextlib.suppress(OSError):
                fs.delete_file(info.path)


def in_order(table: pa.Table, row_ids: list[str]) -> pa.Table:
    """`table` restricted to `row_ids`, in that order (prepared order); raises when one is missing."""
    index = {rid: i for i, rid in enumerate(table.column("row_id").to_pylist())}
    missing = [rid for rid in row_ids if rid not in index]
    if missing:
        raise RuntimeError(f"reference scoring missed {len(missing)} of {len(row_ids)} rows, e.g. {missing[:3]}")
    return table.take(pa.array([index[rid] for rid in row_ids], pa.int64()))


def as_lookup(table: pa.Table) -> dict[str, tuple[float, float | None]]:
    """{row_id: (ref_logp, ref_logp_rejected)}: what `uft_ray.data.prepared.join_columns` attaches to rows."""
    ids = table.column("row_id").to_pylist()
    a = table.column(schema.REF_LOGP).to_pylist()
    b = table.column(schema.REF_LOGP_REJECTED).to_pylist()
    return dict(zip(ids, zip(a, b, strict=True), strict=True))


REFERENCE_FIELDS = [pa.field(schema.REF_LOGP, pa.float64()), pa.field(schema.REF_LOGP_REJECTED, pa.float64())]
