"""Per-rank feeds: bytes each rank's pipeline reads, one pipeline per rank over every row (old) vs one pass
for all ranks (uft_ray.train.feeds, new), and the time until rank 0's first batch.

    python bench/rank_read.py                          # 1,000,000 rows, W = 2 and 4 (minutes on 2 cores)
    python bench/rank_read.py --rows 100000 --workers 2 4
    python bench/rank_read.py --rows 100000 --skip-old # the new way alone

Writes a synthetic prepared directory (schema.TOKENIZED sft rows, 64-256 token ids each, two sources, in
files of 50k rows) with pyarrow, makes the plan with `make_plan`, and for each W builds the feeds both ways
on a local Ray. Bytes read are counted where the rows enter each pipeline: the tagging stage reports the
Arrow bytes of every block it is handed (what the parquet read produced for that pipeline) to a counter
actor. Printed per W:
- `read/rank`: bytes read by each rank's pipeline / the prepared rows' bytes (old: each rank runs its own
  pipeline; new: the one shared pass divided by W);
- `blocks/rank`: the largest rank's materialized blocks (`size_bytes`) / all ranks' blocks together;
- `build s`: until every rank's feed is materialized; `first batch s`: from the start until rank 0's first
  `iter_batches` batch (the driver materializes before training, so this includes the build; the part
  after the build is printed as `first_batch_after_build_s`).
Numbers from a shared 2-core machine are noisy: compare ratios, not absolute values.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from uft_ray import schema

COLUMNS = ["row_id", "source", "kind", "score", "input_ids", "response_start", "length"]  # the driver's, sft rows
COUNTER = "uft-bench-rank-read"
FILE_ROWS = 50_000


def write_prepared(root: Path, n: int, seed: int = 0) -> str:
    """DIR/rows/part-*.parquet: n sft rows (sources a:b = 2:1), token ids of 64-256 tokens, uncompressed."""
    rng = np.random.default_rng(seed)
    rows = root / "rows"
    rows.mkdir(parents=True)
    for k, lo in enumerate(range(0, n, FILE_ROWS)):
        m = min(FILE_ROWS, n - lo)
        lengths = rng.integers(64, 257, m).astype(np.int32)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(rng.integers(0, 150_000, offsets[-1], np.int32)))
        nulls = pa.nulls(m)
        table = pa.table(
            {
                "row_id": [f"row-{i:08d}" for i in range(lo, lo + m)],
                "source": ["a" if i % 3 else "b" for i in range(lo, lo + m)],
                "kind": ["sft"] * m,
                "prompt": pa.nulls(m, schema.TOKENIZED.field("prompt").type),
                "response": nulls.cast(pa.string()),
                "rejected": nulls.cast(pa.string()),
                "score": nulls.cast(pa.float32()),
                "input_ids": ids.cast(schema.TOKENIZED.field("input_ids").type),
                "response_start": lengths // 2,
                "length": lengths,
                "rejected_input_ids": pa.nulls(m, schema.TOKENIZED.field("rejected_input_ids").type),
                "rejected_response_start": nulls.cast(pa.int32()),
                "rejected_length": nulls.cast(pa.int32()),
            },
            schema=schema.TOKENIZED,
        )
        pq.write_table(table, rows / f"part-{k:05d}.parquet", compression="none")
    return str(root)


def counter():
    import ray

    @ray.remote(num_cpus=0)
    class Counter:
        def __init__(self) -> None:
            self.bytes: dict[str, int] = {}

        def add(self, label: str, nbytes: int) -> None:
            self.bytes[label] = self.bytes.get(label, 0) + nbytes

        def get(self) -> dict[str, int]:
            return dict(self.bytes)

    return Counter.options(name=COUNTER).remote()


def counted(batch: pa.Table, *, fn, label: str, **kwargs) -> pa.Table:
    """A tagging stage that first reports the bytes of the block it was handed (the rows it read)."""
    import ray

    ray.get(ray.get_actor(COUNTER).add.remote(label, batch.nbytes))
    return fn(batch, **kwargs)


def old_rank_feeds(prepared: str, plan, start: int, mb: int, ga: int) -> dict:
    """The driver's feeds before the one-pass feeds: per rank, every prepared row tagged with this rank's share, sorted."""
    from uft_ray.data import prepared as prep
    from uft_ray.train.feeds import SORT_PARTITION_ROWS
    from uft_ray.train.plan import rank_assignment

    base = prep.rows_dataset(prepared, COLUMNS)
    every = max(1, SORT_PARTITION_ROWS // (mb * ga))
    boundaries = list(range(start + every, plan.summary.steps, every)) or [plan.summary.steps]
    feeds = {}
    for rank in range(plan.summary.num_workers):
        ds = base.map_batches(
            functools.partial(counted, fn=old_tag_rows, label=f"old/{rank}"),
            fn_kwargs={"assignment": rank_assignment(plan.table, rank, start)},
            batch_format="pyarrow",
            batch_size=None,
        )
        feeds[f"train_{rank}"] = ds.sort(["step", "micro", "slot"], boundaries=boundaries).materialize()
    return feeds


def old_tag_rows(batch, assignment: dict) -> object:
    """The removed `plan.tag_rows`, kept here as the baseline: one output row per (row, epoch) planned for it."""
    import pyarrow as pa

    take, tags = [], []
    for i, row_id in enumerate(batch.column("row_id").to_pylist()):
        for tag in assignment.get(row_id, ()):
            take.append(i)
            tags.append(tag)
    out = batch.take(pa.array(take, pa.int64()))
    for k, name in enumerate(("epoch", "step", "micro", "slot")):
        out = out.append_column(name, pa.array([t[k] for t in tags], pa.int32()))
    return out


def new_rank_feeds(prepared: str, plan, start: int) -> dict:
    from uft_ray.data import prepared as prep
    from uft_ray.train import feeds

    original = feeds.tag_planned
    feeds.tag_planned = functools.partial(counted, fn=original, label="new")  # the same stage, counted
    try:
        return feeds.rank_feeds(prep.rows_dataset(prepared, COLUMNS), plan, start)
    finally:
        feeds.tag_planned = original


def measure(way: str, prepared: str, plan, total_bytes: int, mb: int, ga: int) -> dict:
    import ray

    w = plan.summary.num_workers
    c = counter()
    t0 = time.perf_counter()
    fed = old_rank_feeds(prepared, plan, 0, mb, ga) if way == "old" else new_rank_feeds(prepared, plan, 0)
    build_s = time.perf_counter() - t0
    next(iter(fed["train_0"].iter_batches(batch_size=mb, batch_format="numpy")))
    first_s = time.perf_counter() - t0
    read = ray.get(c.get.remote())
    ray.kill(c)
    per_rank = [read[f"old/{r}"] for r in range(w)] if way == "old" else [read["new"] / w] * w
    blocks = [fed[f"train_{r}"].size_bytes() for r in range(w)]
    rows = [fed[f"train_{r}"].count() for r in range(w)]
    del fed
    return {
        "way": way,
        "workers": w,
        "read_per_rank": [round(b / total_bytes, 3) for b in per_rank],
        "read_total": round(sum(per_rank) / total_bytes, 3),
        "blocks_max_rank": round(max(blocks) / sum(blocks), 3),
        "rows_per_rank": rows,
        "build_s": round(build_s, 1),
        "first_batch_s": round(first_s, 1),
        "first_batch_after_build_s": round(first_s - build_s, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of the local Ray cluster")
    p.add_argument("--skip-old", action="store_true", help="the new way only")
    p.add_argument("--workdir", default=None, help="where the prepared rows go (default: a temp dir, removed)")
    args = p.parse_args()

    import ray
    from ray.data import DataContext

    from uft_ray.config import RayConfig
    from uft_ray.data import prepared as prep
    from uft_ray.ray_utils import init_ray
    from uft_ray.train.plan import make_plan

    work = Path(args.workdir or tempfile.mkdtemp(prefix="uft-bench-rank-read-"))
    results = []
    try:
        t0 = time.perf_counter()
        prepared = write_prepared(work / "prepared", args.rows)
        print(f"[{args.rows} rows] prepared rows written in {time.perf_counter() - t0:.0f}s", flush=True)
        total_bytes = prep.read_rows(prepared, COLUMNS).nbytes  # what one full read of these columns holds
        meta = prep.read_rows(prepared, ["row_id", "source", "length"])
        init_ray(RayConfig(), num_cpus=args.num_cpus)
        DataContext.get_current().enable_progress_bars = False
        for w in args.workers:
            t0 = time.perf_counter()
            plan = make_plan(meta["row_id"].to_pylist(), meta["source"].to_pylist(), meta["length"].to_numpy(),
                             num_workers=w, micro_batch_size=args.micro_batch_size,
                             grad_accum=args.grad_accum)  # fmt: skip
            print(f"W={w}: plan of {plan.summary.rows_planned} rows in {time.perf_counter() - t0:.0f}s", flush=True)
            for way in ("new",) if args.skip_old else ("old", "new"):
                res = {"rows": args.rows, **measure(way, prepared, plan, total_bytes, args.micro_batch_size,
                                                    args.grad_accum)}  # fmt: skip
                results.append(res)
                print(json.dumps(res), flush=True)
        ray.shutdown()
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\nprepared rows: {args.rows}, {total_bytes / 1e6:.0f} MB in memory (columns {', '.join(COLUMNS)})")
    print("W  way  read/rank  read total  blocks/rank (max)  build s  first batch s")
    for r in results:
        print(f"{r['workers']:<2} {r['way']:<4} {max(r['read_per_rank']):<10} {r['read_total']:<11} "
              f"{r['blocks_max_rank']:<18} {r['build_s']:<8} {r['first_batch_s']}")  # fmt: skip


if __name__ == "__main__":
    main()
