"""hint_rft's task files (`rft.path`, `rft.eval_path`) read from object storage (the moto S3 server) give the same
rows, and the same quarantine, as the local files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from uft_ray import storage
from uft_ray.config import load_config
from uft_ray.rft.prompts import task_rows


def _math(i: int, level: int) -> dict[str, Any]:
    return {
        "problem": f"What is {i} + {i}?",
        "level": f"Level {level}",
        "type": "Algebra",
        "solution": f"Add {i} to itself. The sum is $\\boxed{{{2 * i}}}$.",
    }


def _task_files(root: Path) -> Path:
    """A MATH-lighteval layout: train as parquet plus gzipped JSON lines (one line broken), test as JSON lines."""
    (root / "train").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([_math(i, 3 + i % 3) for i in range(6)]), root / "train" / "part-0.parquet")
    lines = [json.dumps(_math(i, 4)) for i in range(6, 9)] + ["{not json", json.dumps(_math(9, 1))]
    (root / "train" / "part-1.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    (root / "test.jsonl").write_text("".join(json.dumps(_math(i, 5)) + "\n" for i in range(20, 24)))
    return root


def _rows(train: str, test: str) -> tuple[list[dict], list[dict], list[dict]]:
    cfg = load_config(
        "jobs/configs/demo_hint_rft_tiny.yaml",
        ["model.path=/tmp", "rft.task=math", f"rft.path={train}", f"rft.eval_path={test}"],
    )  # paths checked: an s3:// rft.path must pass validation
    quarantined: list[dict] = []
    return task_rows(cfg, "train", quarantined), task_rows(cfg, "eval", quarantined), quarantined


def test_task_files_in_a_bucket_read_to_the_same_rows_as_local_files(tmp_path: Path, s3_bucket: str) -> None:
    local = _task_files(tmp_path / "math")
    storage.copy_tree(str(local), f"{s3_bucket}/math")
    train, test, quarantined = _rows(str(local / "train"), str(local / "test.jsonl"))
    assert len(train) == 9 and len(test) == 4  # 6 parquet rows + 3 good lines; the level-1 row is out of scope
    assert {q["reason"] for q in quarantined} == {"malformed", "out_of_scope"}
    remote = _rows(f"{s3_bucket}/math/train", f"{s3_bucket}/math/test.jsonl")
    assert remote[0] == train and remote[1] == test
    assert [q["reason"] for q in remote[2]] == [q["reason"] for q in quarantined]
    assert _rows(f"{s3_bucket}/math/train/*.parquet", f"{s3_bucket}/math/test.jsonl")[0] == train[:6]  # a glob
