"""The reference cache on disk: `{reference.cache_dir}/ref_logp/{fingerprint}/` (docs/internals.md "Reference cache").

    {cache_dir}/ref_logp/{fingerprint}/part-00000.parquet ...   schema.REFERENCE, each row_id exactly once
    {cache_dir}/ref_logp/{fingerprint}/manifest.json            written last: rows, files, fingerprint inputs
    {cache_dir}/ref_logp/file-hashes.json                        sha256 memo of the fingerprint (fingerprint.py)

A cache is published by writing it into a hidden sibling directory and renaming that into place, so a reader
sees either nothing or a complete directory; a directory without a valid manifest, with a listed file missing
or with rows that do not match the expected row ids is treated as a miss and replaced. Concurrent publishers
of one fingerprint (the runs of a sweep) keep the first complete one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from uft_ray import schema, storage
from uft_ray.config import Config
from uft_ray.reference.fingerprint import CACHE_VERSION

MANIFEST = "manifest.json"
HASH_MEMO = "file-hashes.json"
DEFAULT_ROWS_PER_FILE = 100_000


def cache_root(cfg: Config) -> Path:
    """`{reference.cache_dir}/ref_logp`, with `~` expanded."""
    return Path(os.path.expanduser(cfg.reference.cache_dir)) / "ref_logp"


def load_cache(directory: Path, expected_ids: Iterable[str]) -> tuple[pa.Table | None, str]:
    """Read a published cache directory, or return (None, why) when it cannot be trusted.

    Trusted means: a manifest naming this fingerprint, every listed file present with its listed row count,
    and the row ids exactly the expected set, each once.
    """
    manifest_path = directory / MANIFEST
    if not directory.is_dir():
        return None, "absent"
    if not manifest_path.is_file():
        return None, "no manifest (an interrupted write)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        return None, "unreadable manifest"
    if manifest.get("fingerprint") != directory.name or manifest.get("version") != CACHE_VERSION:
        return None, "manifest of another fingerprint or version"
    tables = []
    for entry in manifest.get("files", []):
        f = directory / entry["name"]
        if not f.is_file():
            return None, f"listed file {entry['name']} is missing"
        try:
            if pq.ParquetFile(f).metadata.num_rows != entry["rows"]:
                return None, f"{entry['name']} does not hold its {entry['rows']} rows"
            tables.append(pq.read_table(f, schema=schema.REFERENCE))
        except (OSError, pa.ArrowException) as e:
            return None, f"{entry['name']} is unreadable: {e}"
    table = pa.concat_tables(tables) if tables else schema.REFERENCE.empty_table()
    expected = set(expected_ids)
    ids = table.column("row_id").to_pylist()
    if table.num_rows != manifest.get("rows") or len(ids) != len(expected) or set(ids) != expected:
        return None, f"rows do not match: cache {table.num_rows}, expected {len(expected)}"
    if table.column(schema.REF_LOGP).null_count:
        return None, "ref_logp has nulls"
    return table, "ok"


def write_cache(
    root: Path,
    fp: str,
    table: pa.Table,
    inputs: dict[str, Any],
    *,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Publish `table` (schema.REFERENCE, one row per row_id) as `root/fp`; the manifest is written last.

    Written into a hidden sibling directory and renamed into place, so concurrent runs of one fingerprint (a
    sweep) never see each other's half-written files: the first rename wins and the others discard theirs.
    """
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root, fp)
    final = root / fp
    tmp = root / f".{fp}.partial-{uuid.uuid4().hex}"
    tmp.mkdir()
    table = table.select(schema.REFERENCE.names).cast(schema.REFERENCE)
    files = []
    for k, start in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
        part = table.slice(start, rows_per_file)
        name = f"part-{k:05d}.parquet"
        pq.write_table(part, tmp / name)
        files.append({"name": name, "rows": part.num_rows, "bytes": (tmp / name).stat().st_size})
    manifest = {
        "version": CACHE_VERSION,
        "fingerprint": fp,
        "rows": table.num_rows,
        "files": files,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": inputs,
        **(extra or {}),
    }
    storage.write_json(str(tmp / MANIFEST), manifest, sort_keys=True)  # last, fsynced: what readers trust
    if final.exists():
        if load_cache(final, table.column("row_id").to_pylist())[0] is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # an identical run published while we scored: keep theirs
            return final
        shutil.rmtree(final, ignore_errors=True)  # damaged or partial: replace it
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another run published the same fingerprint first
    return final


def _remove_stale_partials(root: Path, fp: str, max_age_s: float = 3600.0) -> None:
    # Leftovers of killed runs; a live writer finishes in far less than an hour.
    for d in root.glob(f".{fp}.partial-*"):
        with contextlib.suppress(OSError):
            if time.time() - d.stat().st_mtime > max_age_s:
                shutil.rmtree(d, ignore_errors=True)


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
