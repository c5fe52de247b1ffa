"""The per-rank feeds: each training rank's rows in plan order, built from the prepared rows in one pass.

Rank r trains exactly its plan rows in plan order (uft_ray.train.plan), read as its own dataset `train_{r}`
(Ray Data's `streaming_split` would hand blocks to whichever rank asks first: no exact resume). Building
one pipeline per rank, each over all the prepared rows, reads the data W times; instead one pass
serves every rank:

1. `plan_positions`: the plan's entries from step `start` on, numbered in rank-major plan order
   (rank, step, micro, slot) by one int64, `plan_position`. Rank r's entries are the positions
   [offset_r, offset_r+1).
2. One `map_batches` over the prepared rows tags each planned row with its position (one output row per
   planned (row, epoch), unplanned rows dropped): a vectorized `index_in` of the plan's row_ids into the
   block's, against a plan table that travels as Arrow buffers (no per-task Python dict to unpickle).
3. One sort by `plan_position`, with boundaries at every rank's offset plus a cut every `partition_rows`
   rows: known boundaries, so no sampling pass, and no sorted block straddles two ranks.
4. `split_at_indices` at the rank offsets: the cuts fall on block boundaries, so the split moves no data
   and rank r's dataset references only its own blocks (about 1/W of the bytes).

The worker loop still checks every micro-batch's position (`step`, `micro`, `slot`), so an ordering bug
fails loudly. The hint_rft prompt feeds are the same shape (`micro` 0): pass the prompt rows and their
`attach_hints` as `transform`. The held-out feeds `eval_{r}` too (`table_feeds` with a plan-like table: rank
r's share of the held-out rows at step 0, micro 0, slot k).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

    from uft_ray.train.plan import Plan

POSITION = "plan_position"  # int64: the row's place in rank-major plan order, the one sort key
TAGS = ("epoch", "step", "micro", "slot")  # the plan columns every feed row carries (the loop checks them)
# Rows per sorted partition: blocks of a few MB of token ids, a few hundred reduce tasks per million rows.
SORT_PARTITION_ROWS = 4096


def plan_positions(plan_table: pa.Table, num_workers: int, start: int = 0) -> tuple[pa.Table, np.ndarray]:
    """The plan's entries with `step >= start` in rank-major plan order, and each rank's number of them.

    Columns: `row_id`, `plan_position` (0, 1, 2, ... in this order), `epoch`, `step`, `micro`, `slot`.
    """
    t = plan_table.filter(pc.greater_equal(plan_table["step"], start))
    t = t.sort_by([("rank", "ascending"), ("step", "ascending"), ("micro", "ascending"), ("slot", "ascending")])
    counts = np.bincount(t["rank"].to_numpy(), minlength=num_workers)
    if len(counts) > num_workers:
        raise ValueError(f"the plan has ranks up to {len(counts) - 1}, but num_workers is {num_workers}")
    positions = pa.table(
        {
            "row_id": t["row_id"].combine_chunks(),
            POSITION: pa.array(np.arange(t.num_rows, dtype=np.int64)),
            **{k: t[k].combine_chunks() for k in TAGS},
        }
    )
    return positions, counts


def tag_planned(batch: pa.Table, positions: pa.Table) -> pa.Table:
    """A `map_batches` stage: one output row per planned (row, epoch) whose row is in `batch`, tagged with
    `plan_position` and the plan's columns; rows the plan does not train are dropped. Order is left to the sort.
    """
    ids = batch["row_id"].combine_chunks().cast(positions["row_id"].type)
    # Looking the plan's ids up in the block (not the block's in the plan) hashes only the block's ids, and
    # gives a row planned in several epochs once per epoch.
    where = pc.index_in(positions["row_id"], value_set=ids)
    hit = pc.is_valid(where)
    out = batch.take(pc.filter(where, hit))
    planned = positions.filter(hit)
    for name in (POSITION, *TAGS):
        out = out.append_column(name, planned[name])
    return out


def rank_feeds(
    rows: ray.data.Dataset,
    plan: Plan,
    start: int = 0,
    *,
    transform: Callable[[pa.Table], pa.Table] | None = None,
    partition_rows: int = SORT_PARTITION_ROWS,
) -> dict[str, ray.data.MaterializedDataset]:
    """`{"train_0": ds, ...}`: every rank's planned rows from step `start` on, in plan order, materialized.

    `rows`: the rows the plan names by `row_id` (the prepared rows, e.g. `prepared.rows_dataset(dir, columns)`,
    or the hint_rft prompt table). `transform`: applied to each tagged block before the sort (a picklable
    `pyarrow.Table -> pyarrow.Table`, e.g. `functools.partial(attach_hints, schedule=...)`). The rows are read
    once for all ranks; see the module docstring for how.
    """
    return table_feeds(rows, plan.table, plan.summary.num_workers, start, transform=transform,
                       partition_rows=partition_rows)  # fmt: skip


def table_feeds(
    rows: ray.data.Dataset,
    table: pa.Table,
    num_workers: int,
    start: int = 0,
    *,
    prefix: str = "train_",
    transform: Callable[[pa.Table], pa.Table] | None = None,
    partition_rows: int = SORT_PARTITION_ROWS,
) -> dict[str, ray.data.MaterializedDataset]:
    """`{f"{prefix}{rank}": ds, ...}` for a plan-like `table` (`row_id`, `rank`, `epoch`, `step`, `micro`,
    `slot`; e.g. the held-out rows' `uft_ray.evaluation.heldout.heldout_plan`): what `rank_feeds` does for a
    plan. A rank with no rows gets an empty dataset; a table with none from `start` on is an error.
    """
    positions, counts = plan_positions(table, num_workers, start)
    total = int(counts.sum())
    if total == 0:
        raise ValueError(f"{prefix}*: no planned rows from step {start} on")
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    cuts = sorted(
        {int(offsets[r] + k) for r in range(num_workers) for k in range(0, int(counts[r]), partition_rows)} - {0}
    )
    # An empty boundary list would make Ray sample boundaries; one at the end keeps them known.
    boundaries = cuts or [total]

    tagged = rows.map_batches(tag_planned, fn_kwargs={"positions": positions}, batch_format="pyarrow", batch_size=None)
    if transform is not None:
        tagged = tagged.map_batches(transform, batch_format="pyarrow", batch_size=None)
    ordered = tagged.sort(POSITION, boundaries=boundaries)
    parts = ordered.split_at_indices([int(o) for o in offsets[1:-1]]) if num_workers > 1 else [ordered.materialize()]
    for rank, (part, n) in enumerate(zip(parts, counts, strict=True)):
        if part.count() != n:  # a prepared directory missing planned rows: training them would hang the ranks
            raise ValueError(f"{prefix}{rank}: {part.count()} rows found for its {n} planned rows (step >= {start})")
    return {f"{prefix}{rank}": part for rank, part in enumerate(parts)}


class Background:
    """Runs `fn(*args, **kwargs)` in a daemon thread (Ray runs the tasks; this thread only waits), so the
    driver builds the feeds while it looks up the reference log-probs or starts the rollout actors.

    Measured on the demo (2 cores): the first step's data wait fell from 14 s (the worker starting its own
    pipeline after the model load) to 0.5 s. The cost: the planned rows' token ids sit in the object store
    (spilled to disk beyond its size) for the run, instead of streaming.
    """

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._out: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), name="uft-ray-feeds", daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> None:
        try:
            self._out = fn(*args, **kwargs)
        except BaseException as e:  # re-raised in the driver's thread
            self._error = e

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._out

    def abandon(self) -> None:
        """The driver failed meanwhile: wait until the build has stopped (its Ray tasks end with it), then drop
        what it built, so that the blocks leave the object store and nothing of the run keeps working."""
        self._thread.join()
        self._out, self._error = None, None
