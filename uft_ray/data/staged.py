"""Staged candidates: what the band passes write under DIR/_work, and the select pass that keeps the quota.

The band passes map `tokenize_block` over the rows whose rank falls in a band and write STAGE_SCHEMA files, one
directory per pass. The driver reads back only their ranks (`staged_ranks`) and, for a row id staged twice, the
copy to keep (`keepers`: the first in file order). The select pass (`StagedDatasource`, one read task per
staged file) runs `select_block`, which writes DIR/rows and quarantines the too-long rows and duplicates the
seeded walk reached; `count_rows` counts what it wrote. See `uft_ray.data.pipeline` for the passes in order.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from uft_ray import schema
from uft_ray.data import mixture
from uft_ray.data import prepared as prep
from uft_ray.data import quarantine as q
from uft_ray.data.mixture import Take
from uft_ray.data.quarantine import Quarantined, Reject
from uft_ray.data.tokenize import cached_encoder
from uft_ray.storage import filesystem_for

# Staged (tokenized) candidates: ok rows with tokens, too_long rows with why and the row as JSON.
STAGE_SCHEMA = pa.schema(
    [
        *schema.TOKENIZED,
        ("_rank", pa.uint64()),
        ("_origin", pa.string()),
        ("_status", pa.string()),
        ("_detail", pa.string()),
        ("_raw", pa.string()),
    ]
)


def _unified_json(row: dict[str, Any]) -> str:
    keep = {k: row.get(k) for k in (*schema.UNIFIED.names, "_origin")}
    return json.dumps(keep, ensure_ascii=False)


def tokenize_block(batch: pa.Table, model_key: tuple, tokenize_key: tuple) -> pa.Table:
    """READ_SCHEMA rows -> STAGE_SCHEMA rows: tokenized (`ok`) or `too_long` with the reason's detail."""
    enc = cached_encoder(model_key, tokenize_key)
    rows = batch.to_pylist()
    out = []
    for row, res in zip(rows, enc.encode_batch(rows), strict=True):
        if isinstance(res, Reject):
            out.append(
                {
                    **row,
                    "_status": q.TOO_LONG,
                    "_detail": f"{row['_origin']} (row_id {row['row_id']}): {res.detail}",
                    "_raw": _unified_json(row),
                }
            )
        else:
            res["_status"] = "ok"
            out.append(res)
    return pa.Table.from_pylist(out, schema=STAGE_SCHEMA)


def select_block(
    batch: pa.Table, takes: dict[str, tuple], keepers: dict[str, dict[int, str]], quarantine_dir: str
) -> pa.Table:
    """STAGE_SCHEMA rows -> the selected rows (schema.TOKENIZED), upsampled copies included.

    Quarantines the too-long rows and the duplicate row ids that the seeded walk reached before the quota
    filled (rows past the cutoff were tokenized only because bands overshoot: they are not reported).
    """
    take = {s: Take(*t) for s, t in takes.items()}
    out: list[dict[str, Any]] = []
    bad: list[Quarantined] = []
    cols = schema.TOKENIZED.names
    for row in batch.to_pylist():
        t, r, src = take[row["source"]], row["_rank"], row["source"]
        if row["_status"] != "ok":
            if t.visited(r):
                bad.append(Quarantined(row["_status"], src, row["_detail"], row["_raw"]))
            continue
        keeper = keepers.get(src, {}).get(r)
        if keeper is not None and row["_origin"] != keeper:
            if t.visited(r):
                detail = f"{row['_origin']}: row_id {row['row_id']} was already given by {keeper}"
                bad.append(Quarantined(q.DUPLICATE, src, detail, _unified_json(row)))
            continue
        for k in range(t.copies(r)):
            new = {c: row[c] for c in cols}
            new["row_id"] = mixture.copy_id(row["row_id"], k)
            out.append(new)
    if bad:
        key = hashlib.sha1("\x1f".join(b.detail for b in bad).encode()).hexdigest()
        q.write_records(quarantine_dir, q.file_name("select", bad[0].source, key), bad)
    return pa.Table.from_pylist(out, schema=schema.TOKENIZED)


def _select_file(
    uri: str, takes: dict[str, tuple], keepers: dict[str, dict[int, str]], qdir: str
) -> Iterator[pa.Table]:
    fs, path = filesystem_for(uri)
    with fs.open_input_file(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=4096):
            yield select_block(pa.Table.from_batches([batch]), takes, keepers, qdir)


class StagedDatasource(Datasource):
    """The select pass: one read task per staged file, yielding the selected rows (schema.TOKENIZED)."""

    def __init__(self, files: list[str], takes: dict[str, tuple], keepers: dict[str, dict[int, str]], qdir: str):
        super().__init__()
        self.files, self.takes, self.keepers, self.qdir = files, takes, keepers, qdir

    def get_name(self) -> str:
        return "UftSelect"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None):
        return [
            ReadTask(
                functools.partial(_select_file, f, self.takes, self.keepers, self.qdir),
                BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=(f,)),
                per_task_row_limit=per_task_row_limit,
            )
            for f in self.files
        ]


# ---------------------------------------------------------------------------------------------------------
# Read back on the driver


def _scan(files: list[str], fs: pafs.FileSystem, columns: list[str], filter: Any = None) -> Iterator[pa.RecordBatch]:
    if not files:
        return iter(())
    return pads.dataset(files, filesystem=fs, format="parquet").to_batches(columns=columns, filter=filter)


def staged_ranks(stage_dir: str) -> tuple[dict[str, np.ndarray], Counter[str]]:
    """Per source: the ranks of staged `ok` rows; and the number of staged rows (ok + too_long)."""
    fs, files = prep.parquet_files(stage_dir)
    ranks: dict[str, list[np.ndarray]] = {}
    staged: Counter[str] = Counter()
    for b in _scan(files, fs, ["source", "_rank", "_status"]):
        src = b.column(0).to_numpy(zero_copy_only=False)
        rk = b.column(1).to_numpy(zero_copy_only=False).astype(np.uint64)
        ok = b.column(2).to_numpy(zero_copy_only=False) == "ok"
        for s in np.unique(src):
            m = src == s
            staged[str(s)] += int(m.sum())
            ranks.setdefault(str(s), []).append(rk[m & ok])
    return {s: np.concatenate(v) for s, v in ranks.items()}, staged


def _file_order(origin: str) -> tuple[str, tuple[int, ...]]:
    """Where a row sorts in file order: (relpath, positions) of its origin "relpath:pos" (a pair: "relpath:pos+pos").

    Positions compare as numbers: as strings, "train.jsonl:10" comes before "train.jsonl:9".
    """
    path, _, pos = origin.rpartition(":")
    return path, tuple(int(p) for p in pos.split("+"))


def keepers(stage_dirs: list[str], dups: dict[str, np.ndarray]) -> dict[str, dict[int, str]]:
    """For each duplicated row id (same rank): the origin of the copy to keep, the first in file order."""
    if not any(len(v) for v in dups.values()):
        return {}
    out: dict[str, dict[int, str]] = {}
    for d in stage_dirs:
        fs, files = prep.parquet_files(d)
        for s, ranks in dups.items():
            if not len(ranks):
                continue
            flt = (pc.field("source") == s) & pc.field("_rank").isin(pa.array(ranks, pa.uint64()))
            for b in _scan(files, fs, ["_rank", "_origin"], flt):
                for r, o in zip(b.column(0).to_pylist(), b.column(1).to_pylist(), strict=True):
                    cur = out.setdefault(s, {}).get(r)
                    out[s][r] = o if cur is None else min(cur, o, key=_file_order)
    return out


def count_rows(rows_dir: str) -> tuple[Counter[str], Counter[str]]:
    """Rows per source in DIR/rows, and how many are upsampled copies (row_id with '#')."""
    fs, files = prep.parquet_files(rows_dir)
    rows: Counter[str] = Counter()
    copies: Counter[str] = Counter()
    for b in _scan(files, fs, ["source", "row_id"]):
        src = b.column(0).to_pylist()
        is_copy = pc.match_substring(b.column(1), "#").to_pylist()
        rows.update(src)
        copies.update(s for s, c in zip(src, is_copy, strict=True) if c)
    return rows, copies
