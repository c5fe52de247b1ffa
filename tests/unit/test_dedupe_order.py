"""Duplicate row ids in the staged rows: the copy kept is the first in file order, by position as a number.

Origins are "relpath:pos" (a HelpSteer2 pair "relpath:pos+pos"). As strings, "train.jsonl:10" sorts before
"train.jsonl:9", so the row at position 10 was kept and the one at 9 quarantined as its duplicate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from uft_ray.data import quarantine as q
from uft_ray.data.staged import STAGE_SCHEMA, keepers, select_block

RANK = 42  # one rank: the same row id, so the same content


def _stage(stage_dir: Path, origins: list[str], source: str = "uc") -> pa.Table:
    """A staged file with one `ok` row per origin, every one the same row (same row id, same rank)."""
    stage_dir.mkdir(parents=True)
    rows = [
        {
            "row_id": f"{source}-same",
            "source": source,
            "kind": "sft",
            "prompt": [{"role": "user", "content": "p"}],
            "response": "r",
            "score": 1.0,
            "input_ids": [1, 2, 3],
            "response_start": 1,
            "length": 3,
            "_rank": RANK,
            "_origin": o,
            "_status": "ok",
        }
        for o in origins
    ]
    table = pa.Table.from_pylist(rows, schema=STAGE_SCHEMA)
    pq.write_table(table, stage_dir / "part-0.parquet")
    return table


def test_position_9_is_kept_over_position_10_of_the_same_file(tmp_path: Path) -> None:
    staged = _stage(tmp_path / "pass0", ["uc/train.jsonl:10", "uc/train.jsonl:9"])

    keep = keepers([str(tmp_path / "pass0")], {"uc": np.array([RANK], np.uint64)})
    assert keep == {"uc": {RANK: "uc/train.jsonl:9"}}

    # The select pass keeps the row at 9 once and quarantines the one at 10 as its duplicate.
    qdir = tmp_path / "quarantine"
    out = select_block(staged, {"uc": (RANK, 1, None)}, keep, str(qdir))
    assert out.num_rows == 1
    (record,) = q.read_quarantine(str(qdir)).to_pylist()
    assert record["reason"] == q.DUPLICATE
    assert record["detail"] == "uc/train.jsonl:10: row_id uc-same was already given by uc/train.jsonl:9"


def test_pairs_and_passes_compare_by_position_and_file(tmp_path: Path) -> None:
    # a pair's origin is its first row's position; copies may be staged by different band passes
    _stage(tmp_path / "pass0", ["hs/train.jsonl:10+11", "hs/b.jsonl:2"], source="hs")
    _stage(tmp_path / "pass1", ["hs/train.jsonl:8+9", "hs/a.jsonl:100"], source="hs")
    dirs = [str(tmp_path / "pass0"), str(tmp_path / "pass1")]

    assert keepers(dirs, {"hs": np.array([RANK], np.uint64)}) == {"hs": {RANK: "hs/a.jsonl:100"}}
    _stage(tmp_path / "only_train", ["hs/train.jsonl:10+11", "hs/train.jsonl:8+9"], source="hs")
    only = keepers([str(tmp_path / "only_train")], {"hs": np.array([RANK], np.uint64)})
    assert only == {"hs": {RANK: "hs/train.jsonl:8+9"}}
