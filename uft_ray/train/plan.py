"""The training data plan: which row each rank trains at each step, decided once, before training.

Pure (numpy + pyarrow). The driver reads `row_id, source, length` of the prepared rows and calls `make_plan`;
the plan is saved as `{run_dir}/plan.parquet` and every worker trains exactly its rows in plan order, so a
run is reproducible from (rows, seed, batch shape) alone and a resume at step k trains the rows with
`step >= k` and nothing else (docs/internals.md, "Training data plan").

How one epoch is laid out:
1. Each source's rows are shuffled (seeded by `(seed, epoch)`), then the sources are *interleaved* evenly:
   row i of a source with n rows gets the position key `(i + u) / n` (u random per source). Any prefix of
   the sequence then holds every source in its target proportion to within one row, so the realized
   mixture tracks the target at every step, not only at the end of the epoch.
2. The sequence is cut into global batches of `num_workers * micro_batch_size * grad_accum` rows; the tail
   that cannot fill one is dropped and counted (every rank must run the same number of steps, or the
   collectives hang).
3. Length grouping (optional): within a window of `megabatch_steps` batches, each source's rows are sorted
   by length and dealt out so that every batch keeps its composition from step 2 but takes its rows from one
   length quantile of each source; which quantile lands on which step is a seeded permutation, so the run
   does not go short-to-long. Padding falls because a batch's rows have similar lengths; the mixture is
   untouched because only rows *of the same source* are exchanged between batches.
4. Inside a global batch, rows are sorted longest first and cut into micro-batches; micro-batch j goes to
   rank `j % num_workers`, micro index `j // num_workers`, so the ranks' micro-batches at the same index
   have similar lengths (ZeRO-3 gathers layers in lockstep: the slowest rank sets the pace).

`max_steps` follows Hugging Face's `Trainer`: when set, it is the number of steps and overrides `epochs`
(epochs repeat, each reshuffled, until the steps are reached).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from uft_ray import storage

PLAN_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("source", pa.string()),
        ("length", pa.int32()),
        ("epoch", pa.int32()),
        ("step", pa.int32()),  # 0-based optimizer step; metrics.jsonl's `step` is this + 1
        ("rank", pa.int32()),
        ("micro", pa.int32()),  # micro-batch index within the step on this rank (gradient accumulation)
        ("slot", pa.int32()),  # position within the micro-batch
    ]
)
# A window this many global batches wide is sorted by length at once: wide enough that a batch's rows have
# similar lengths, narrow enough that one window is a small share of an epoch on real data.
DEFAULT_MEGABATCH_STEPS = 64
PLAN_METADATA = b"uft_ray.plan"  # the summary's key in the parquet schema metadata


@dataclass
class PlanSummary:
    global_batch_size: int
    num_workers: int
    micro_batch_size: int
    grad_accum: int
    steps: int
    steps_per_epoch: int
    epochs: int  # epochs the plan touches (the last one may be cut by max_steps)
    rows_per_epoch: int
    rows_planned: int
    tail_dropped: int  # rows of the planned full epochs that could not fill a global batch
    tail_dropped_by_source: dict[str, int] = field(default_factory=dict)
    rows_by_source: dict[str, int] = field(default_factory=dict)  # planned rows, summed over epochs
    target_fraction: dict[str, float] = field(default_factory=dict)  # each source's share of the prepared rows
    padding_frac: float = 0.0  # pad tokens / padded tokens, micro-batches padded to their own max length
    seed: int = 0
    group_by_length: bool = True
    fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    table: pa.Table  # PLAN_SCHEMA, sorted by (step, rank, micro, slot)
    summary: PlanSummary

    def save(self, path: str) -> None:
        meta = {PLAN_METADATA: json.dumps(self.summary.to_dict()).encode()}
        table = self.table.replace_schema_metadata(meta)
        storage.atomic_write(path, lambda f: pq.write_table(table, f))


def load_plan(path: str) -> Plan:
    table = pq.read_table(path)
    summary = PlanSummary(**json.loads(table.schema.metadata[PLAN_METADATA]))
    return Plan(table.replace_schema_metadata(None), summary)


def read_plan_summary(path: str) -> PlanSummary:
    """A saved plan's summary alone (from the parquet footer: no rows read)."""
    return PlanSummary(**json.loads((pq.read_schema(path).metadata or {})[PLAN_METADATA]))


def make_plan(
    row_ids: list[str] | np.ndarray,
    sources: list[str] | np.ndarray,
    lengths: list[int] | np.ndarray,
    *,
    num_workers: int,
    micro_batch_size: int,
    grad_accum: int = 1,
    seed: int = 0,
    epochs: int = 1,
    max_steps: int | None = None,
    group_by_length: bool = True,
    megabatch_steps: int = DEFAULT_MEGABATCH_STEPS,
) -> Plan:
    """Assign every trainable row to (epoch, step, rank, micro, slot); see the module docstring.

    `lengths` are the padded lengths a row costs (for pairs, the longer of chosen and rejected). The result
    depends only on the rows (as a set: their input order does not matter), the seed and the batch shape.
    Phases: check the inputs and count the steps; put the rows in canonical order; lay out each epoch (steps
    1-4 of the module docstring); build the table and its summary.
    """
    row_ids, sources, lengths = _checked(row_ids, sources, lengths, num_workers, micro_batch_size, grad_accum)
    g = num_workers * micro_batch_size * grad_accum
    steps_per_epoch, epochs, total_steps = _step_counts(len(row_ids), g, epochs, max_steps, num_workers,
                                                         micro_batch_size, grad_accum)  # fmt: skip

    # Canonical input order (sorted ids) so that the plan does not depend on how the files were read.
    canon = np.argsort(row_ids.astype(str), kind="stable")
    row_ids, sources, lengths = row_ids[canon], sources[canon], lengths[canon]
    names = sorted(set(sources.tolist()))
    by_source = [np.flatnonzero(sources == s) for s in names]

    columns: dict[str, list[np.ndarray]] = {k: [] for k in ("idx", "epoch", "step", "rank", "micro", "slot")}
    tail_by_source = dict.fromkeys(names, 0)
    for epoch in range(epochs):
        first_step = epoch * steps_per_epoch
        n_steps = min(steps_per_epoch, total_steps - first_step)
        rng = np.random.default_rng([seed, epoch])
        seq = _interleave(by_source, rng)  # 1. shuffle each source, interleave evenly
        if n_steps == steps_per_epoch:  # 2. the tail; an epoch cut short by max_steps has unreached rows instead
            for i in seq[steps_per_epoch * g :]:
                tail_by_source[sources[i]] += 1
        batches = seq[: steps_per_epoch * g].reshape(steps_per_epoch, g)
        if group_by_length:  # 3. same-source swaps between the batches of a window
            batches = _group_by_length(batches, sources, lengths, rng, megabatch_steps)
        for b in range(n_steps):  # 4. micro-batches to ranks
            _deal(columns, batches[b], lengths if group_by_length else None, epoch, first_step + b,
                  num_workers, micro_batch_size)  # fmt: skip

    table = _plan_table(columns, row_ids, sources, lengths)
    planned_sources = table.column("source").to_numpy(zero_copy_only=False)
    summary = PlanSummary(
        global_batch_size=g,
        num_workers=num_workers,
        micro_batch_size=micro_batch_size,
        grad_accum=grad_accum,
        steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        rows_per_epoch=len(row_ids),
        rows_planned=table.num_rows,
        tail_dropped=sum(tail_by_source.values()),
        tail_dropped_by_source=tail_by_source,
        rows_by_source={s: int(np.sum(planned_sources == s)) for s in names},
        target_fraction={s: len(ix) / len(row_ids) for s, ix in zip(names, by_source, strict=True)},
        padding_frac=padding_frac(table),
        seed=seed,
        group_by_length=group_by_length,
    )
    summary.fingerprint = fingerprint(table)
    return Plan(table, summary)


def _checked(
    row_ids: Any, sources: Any, lengths: Any, num_workers: int, micro_batch_size: int, grad_accum: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    row_ids = np.asarray(row_ids, dtype=object)
    sources = np.asarray(sources, dtype=object)
    lengths = np.asarray(lengths, dtype=np.int64)
    if not (len(row_ids) == len(sources) == len(lengths)):
        raise ValueError("row_ids, sources and lengths must have the same length")
    if len(set(row_ids.tolist())) != len(row_ids):
        raise ValueError("row_ids must be unique (upsampled copies carry a '#k' suffix)")
    for name, v in (("num_workers", num_workers), ("micro_batch_size", micro_batch_size), ("grad_accum", grad_accum)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    return row_ids, sources, lengths


def _step_counts(
    n: int, g: int, epochs: int, max_steps: int | None, num_workers: int, micro_batch_size: int, grad_accum: int
) -> tuple[int, int, int]:
    """(steps per epoch, epochs touched, total steps); `max_steps` overrides `epochs` (Hugging Face's rule)."""
    steps_per_epoch = n // g
    if steps_per_epoch == 0:
        raise ValueError(
            f"{n} trainable rows cannot fill one global batch of {g} rows "
            f"(num_workers {num_workers} x micro_batch_size {micro_batch_size} x grad_accum {grad_accum})"
        )
    if max_steps is not None:
        return steps_per_epoch, math.ceil(max_steps / steps_per_epoch), max_steps
    return steps_per_epoch, epochs, epochs * steps_per_epoch


def _deal(
    columns: dict[str, list[np.ndarray]],
    rows: np.ndarray,
    lengths: np.ndarray | None,
    epoch: int,
    step: int,
    num_workers: int,
    micro_batch_size: int,
) -> None:
    """One global batch into micro-batches: longest first (when grouping by length), micro j -> rank j % W."""
    g = len(rows)
    if lengths is not None:
        rows = rows[np.argsort(-lengths[rows], kind="stable")]
    j = np.arange(g) // micro_batch_size  # micro-batch index within the global batch
    columns["idx"].append(rows)
    columns["epoch"].append(np.full(g, epoch))
    columns["step"].append(np.full(g, step))
    columns["rank"].append(j % num_workers)
    columns["micro"].append(j // num_workers)
    columns["slot"].append(np.arange(g) % micro_batch_size)


def _plan_table(
    columns: dict[str, list[np.ndarray]], row_ids: np.ndarray, sources: np.ndarray, lengths: np.ndarray
) -> pa.Table:
    """PLAN_SCHEMA rows sorted by (step, rank, micro, slot)."""
    cat = {k: np.concatenate(v).astype(np.int64) for k, v in columns.items()}
    order = np.lexsort((cat["slot"], cat["micro"], cat["rank"], cat["step"]))
    cat = {k: v[order] for k, v in cat.items()}
    idx = cat.pop("idx")
    return pa.table(
        {
            "row_id": pa.array(row_ids[idx].tolist(), pa.string()),
            "source": pa.array(sources[idx].tolist(), pa.string()),
            "length": pa.array(lengths[idx], pa.int32()),
            **{k: pa.array(v, pa.int32()) for k, v in cat.items()},
        },
        schema=PLAN_SCHEMA,
    )


def _interleave(by_source: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Shuffle each source, then merge them so that every prefix holds each source in proportion (+-1 row)."""
    keys, tie, rows = [], [], []
    for k, ix in enumerate(by_source):
        shuffled = ix[rng.permutation(len(ix))]
        keys.append((np.arange(len(ix)) + rng.random()) / len(ix))
        tie.append(np.full(len(ix), k))
        rows.append(shuffled)
    keys_a, tie_a, rows_a = np.concatenate(keys), np.concatenate(tie), np.concatenate(rows)
    return rows_a[np.lexsort((tie_a, keys_a))]


def _group_by_length(
    batches: np.ndarray, sources: np.ndarray, lengths: np.ndarray, rng: np.random.Generator, window: int
) -> np.ndarray:
    """Exchange rows of the same source between the batches of each window so a batch's lengths are close."""
    out = batches.copy()
    for start in range(0, len(batches), window):
        block = batches[start : start + window]
        # quantile q of every source goes to batch order[q]: a random step, so lengths do not trend.
        order = rng.permutation(len(block))
        for s in np.unique(sources[block.ravel()]):
            members = block.ravel()[sources[block.ravel()] == s]
            members = members[np.argsort(lengths[members], kind="stable")]
            counts = (sources[block] == s).sum(axis=1)
            pos = 0
            for b in order:
                c = counts[b]
                slots = np.flatnonzero(sources[block[b]] == s)
                out[start + b, slots] = members[pos : pos + c]
                pos += c
    return out


def padding_frac(table: pa.Table) -> float:
    """Pad tokens / padded tokens when every micro-batch is right-padded to its own longest row."""
    if table.num_rows == 0:
        return 0.0
    step = table["step"].to_numpy().astype(np.int64)
    rank = table["rank"].to_numpy().astype(np.int64)
    micro = table["micro"].to_numpy().astype(np.int64)
    length = table["length"].to_numpy().astype(np.int64)
    key = (step * (int(rank.max()) + 1) + rank) * (int(micro.max()) + 1) + micro
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    longest = np.zeros(len(counts), dtype=np.int64)
    np.maximum.at(longest, inverse, length)
    padded = int((longest * counts).sum())
    return 1.0 - int(length.sum()) / padded if padded else 0.0


def fingerprint(table: pa.Table) -> str:
    """sha1 of the plan's assignment, to check that a resumed run follows the same plan."""
    h = hashlib.sha1()
    for name in ("row_id", "step", "rank", "micro", "slot"):
        h.update("\x1f".join(map(str, table[name].to_pylist())).encode())
    return h.hexdigest()


def rank_assignment(table: pa.Table, rank: int, start_step: int = 0) -> dict[str, list[tuple[int, int, int, int]]]:
    """row_id -> [(epoch, step, micro, slot), ...] of `rank`'s rows with `step >= start_step`.

    A row appears once per epoch that trains it, hence the list. The driver joins only these rows' reference
    log-probs into the rank's feed; the feeds themselves are tagged by uft_ray.train.feeds.
    """
    t = table.filter(pc.and_(pc.equal(table["rank"], rank), pc.greater_equal(table["step"], start_step)))
    out: dict[str, list[tuple[int, int, int, int]]] = {}
    cols = [t[c].to_pylist() for c in ("row_id", "epoch", "step", "micro", "slot")]
    for row_id, epoch, step, micro, slot in zip(*cols, strict=True):
        out.setdefault(row_id, []).append((epoch, step, micro, slot))
    return out
