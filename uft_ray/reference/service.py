"""The reference service's driver side: give every prepared row its reference log-probs, once per fingerprint.

The reference is frozen and the data fixed, so `ref_logp` is a function of (reference weights, token ids):
computed once per fingerprint (uft_ray.reference.fingerprint) and reused across reruns, resumes and beta / lr
sweeps from the cache (uft_ray.reference.cache). Two ways to fill it (`reference.run`):
- `precompute` (`attach_reference`): before training, an actor pool of `ReferenceScorer`s scores every row,
  then ends, freeing its GPUs for training; the cache is published.
- `stream` (`stream_stage`): the scorer is a lazy stage of each trainer dataset on its own actor pool;
  `publish_stream_cache` writes the cache afterwards when every prepared row was scored.
The prepared rows are never rewritten: the trainer's feed joins the cached values by row_id
(`read_reference` + `uft_ray.data.prepared.join_columns`), so runs can share one prepared directory at once.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from uft_ray import schema, storage
from uft_ray.config import Config
from uft_ray.data import prepared
from uft_ray.ray_utils import init_ray
from uft_ray.reference.cache import DEFAULT_ROWS_PER_FILE, HASH_MEMO, cache_root, in_order, load_cache, write_cache
from uft_ray.reference.collector import collected, new_collector
from uft_ray.reference.fingerprint import fingerprint, fingerprint_inputs
from uft_ray.reference.scorer import SCORER_INPUT_COLUMNS, ReferenceScorer, actor_gpus, scorer_kwargs

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

logger = logging.getLogger(__name__)

# Bounded, unlike Ray Data's default of -1: an actor killed by the host's OOM killer on one batch must not
# restart and retry that batch forever. A Python exception (CUDA OOM) is not retried at all: it fails the run.
MAX_ACTOR_RESTARTS = 4
# Passes over the rows the collector still lacks after a precompute pass: a scorer killed after its batch returned
# takes that batch's report with it (reports are asynchronous), and Ray Data does not rerun a finished batch.
RESCORE_PASSES = 2
SUMMARY_KEY = "reference"  # DIR/summary.json["reference"]: the last entry of this service


def read_scoring_columns(prepared_dir: str | os.PathLike) -> pa.Table:
    """The columns the scorer and the fingerprint need, in prepared row order."""
    return prepared.read_rows(os.fspath(prepared_dir), list(SCORER_INPUT_COLUMNS))


def _fingerprint(cfg: Config, rows: pa.Table) -> tuple[dict[str, Any], str]:
    inputs = fingerprint_inputs(cfg, rows, memo_path=storage.join(cache_root(cfg), HASH_MEMO))
    return inputs, fingerprint(inputs)


def stream_stage(
    ds: ray.data.Dataset, cfg: Config, *, collector: Any = None, **scorer_overrides: Any
) -> ray.data.Dataset:
    """Append the scorer to `ds` as a lazy `map_batches` stage on its own actor pool (`reference.run: stream`).

    The stage keeps every input column and adds `ref_logp` / `ref_logp_rejected`. With a `collector`
    (`new_collector()`), each scored batch is also reported there; `publish_stream_cache` then writes the cache
    once every prepared row was scored. Without one, stream mode caches nothing.
    """
    from ray.data import ActorPoolStrategy

    r = cfg.reference
    compute = (
        ActorPoolStrategy(min_size=r.actors[0], max_size=r.actors[1])
        if isinstance(r.actors, list)
        else ActorPoolStrategy(size=r.actors)
    )
    kwargs = {**scorer_kwargs(cfg), "collector": collector, **scorer_overrides}
    num_gpus = actor_gpus(cfg)
    with warnings.catch_warnings():
        # Ray 2.60 deprecates passing remote args by keyword but has no named parameter for restarts yet.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        return ds.map_batches(
            ReferenceScorer,
            fn_constructor_kwargs=kwargs,
            compute=compute,
            batch_size=r.batch_size,
            batch_format="pyarrow",
            num_cpus=r.cpus_per_actor,
            num_gpus=num_gpus or None,
            udf_modifying_row_count=False,
            # A dead actor (node lost, process killed) is restarted and its in-flight batches retried.
            max_restarts=MAX_ACTOR_RESTARTS,
            max_task_retries=MAX_ACTOR_RESTARTS,
        )


def publish_stream_cache(
    cfg: Config,
    prepared_dir: str | os.PathLike,
    collector: Any,
    *,
    seconds: float | None = None,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
) -> dict[str, Any]:
    """After a stream-mode run: publish the collector's rows as the cache when they cover every prepared row.

    Stream mode caches only complete coverage: a run that stopped early (max_steps) or whose plan dropped a
    tail of rows publishes nothing, and the next run scores again. Returns the summary entry (also merged into
    DIR/summary.json) with `complete` telling which happened.
    """
    rows = read_scoring_columns(prepared_dir)
    inputs, fp = _fingerprint(cfg, rows)
    expected = set(rows.column("row_id").to_pylist())
    table, stats = collected(collector, expect_rows=len(expected))
    got = set(table.column("row_id").to_pylist())
    complete = expected <= got
    if complete:
        table = in_order(table, rows.column("row_id").to_pylist())
        write_cache(cache_root(cfg), fp, table, inputs, rows_per_file=rows_per_file, extra={"run": "stream"})
    entry = {
        "cache": "miss",
        "fingerprint": fp,
        "path": storage.join(cache_root(cfg), fp),
        "run": "stream",
        "complete": complete,
        "rows": len(expected),
        "rows_scored": len(got & expected),
        "model_forwards": stats["forwards"],
        "tokens_scored": stats["tokens"],
        "seconds": seconds,
    }
    prepared.merge_summary(os.fspath(prepared_dir), SUMMARY_KEY, entry)
    return entry


def attach_reference(
    cfg: Config,
    prepared_dir: str | os.PathLike,
    *,
    run: str | None = None,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
    **scorer_overrides: Any,
) -> dict[str, Any]:
    """Make sure the cache holds the reference log-probs of every prepared row; returns the summary entry.

    Computes the fingerprint, then:
    - hit: `{cache_dir}/ref_logp/{fingerprint}/` is complete; no Ray, no model.
    - miss, `run == "precompute"` (the default from `cfg.reference.run`): scores every row with the actor pool,
      checks that each row came back exactly once, publishes the cache; the pool ends with the pass, freeing
      its GPUs for training.
    - miss, `run == "stream"`: scores nothing here (`entry["deferred"]`); the trainer adds `stream_stage` to
      its datasets and calls `publish_stream_cache` after.
    The prepared rows are not touched; `read_reference(entry, row_ids)` gives the values.

    The entry, also merged into DIR/summary.json under "reference": `cache` (hit | miss | skipped),
    `fingerprint`, `path` (the cache directory), `rows`, `rows_scored` (rows the model scored in this call),
    `model_forwards`, `tokens_scored`, `seconds`.
    """
    t0 = time.perf_counter()
    prepared_dir = os.fspath(prepared_dir)
    run = run or cfg.reference.run
    if not cfg.needs_reference or cfg.reference.mode != "actor":
        why = "loss.type sft needs no reference" if not cfg.needs_reference else "reference.mode adapter_off"
        entry = {"cache": "skipped", "reason": why, "seconds": 0.0}
        prepared.merge_summary(prepared_dir, SUMMARY_KEY, entry)
        return entry

    rows = read_scoring_columns(prepared_dir)
    row_ids = rows.column("row_id").to_pylist()
    root = cache_root(cfg)
    inputs, fp = _fingerprint(cfg, rows)
    table, why = load_cache(storage.join(root, fp), row_ids)
    entry: dict[str, Any] = {"fingerprint": fp, "path": storage.join(root, fp), "run": run, "rows": len(row_ids)}
    if table is not None:
        entry.update(cache="hit", rows_scored=0, model_forwards=0, tokens_scored=0)
    elif run == "stream":
        logger.info("reference cache %s: %s; rows are scored as they stream into training", fp, why)
        entry.update(cache="miss", miss_reason=why, deferred=True, rows=0, rows_scored=0, model_forwards=0)
        entry["tokens_scored"] = 0
    else:
        logger.info("reference cache %s: %s; scoring %d rows", fp, why, len(row_ids))
        table, stats = _precompute(cfg, rows, **scorer_overrides)
        table = in_order(table, row_ids)
        extra = {"run": run, "model_forwards": stats["forwards"], "duplicates": stats["duplicates"]}
        extra["actors"] = stats["actors"]  # per scorer process: batches and forwards (a restart shows a new pid)
        write_cache(root, fp, table, inputs, rows_per_file=rows_per_file, extra=extra)
        entry.update(
            cache="miss",
            miss_reason=why,
            rows_scored=table.num_rows,
            model_forwards=stats["forwards"],
            tokens_scored=stats["tokens"],
            duplicates=stats["duplicates"],
            actors=len(stats["actors"]),
        )
    entry["seconds"] = round(time.perf_counter() - t0, 3)
    prepared.merge_summary(prepared_dir, SUMMARY_KEY, entry)
    return entry


def read_reference(entry: dict[str, Any], row_ids: list[str]) -> pa.Table:
    """The published values of `attach_reference`'s entry (schema.REFERENCE), in `row_ids` order."""
    table, why = load_cache(entry["path"], row_ids)
    if table is None:
        raise RuntimeError(f"reference cache {entry['path']} cannot be used ({why}); rerun to rescore")
    return in_order(table, row_ids)


def _prepared_dataset(rows: pa.Table, block_rows: int) -> ray.data.Dataset:
    import ray

    # Blocks from the driver's table (not read_parquet on a local path, which other nodes cannot read), each a
    # multiple of the batch size so that batches are the same whatever the pool size: 1 and N actors agree.
    blocks = [rows.slice(s, block_rows) for s in range(0, rows.num_rows, block_rows)]
    return ray.data.from_arrow(blocks)


def _precompute(cfg: Config, rows: pa.Table, **scorer_overrides: Any) -> tuple[pa.Table, dict[str, Any]]:
    import ray

    if rows.num_rows == 0:
        return schema.REFERENCE.empty_table(), {"forwards": 0, "tokens": 0, "duplicates": 0, "actors": []}
    init_ray(cfg.ray)
    collector = new_collector()
    try:
        todo = rows
        for attempt in range(1 + RESCORE_PASSES):
            ds = _prepared_dataset(todo, block_rows=cfg.reference.batch_size * 4)
            ds = stream_stage(ds, cfg, collector=collector, output_columns=["row_id"], **scorer_overrides)
            emitted = 0
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                emitted += batch.num_rows
            if emitted != todo.num_rows:  # Ray Data emits each input row once, retries included
                logger.warning("reference stage emitted %d rows for %d inputs", emitted, todo.num_rows)
            table, stats = collected(collector, expect_rows=rows.num_rows)
            todo = unscored_rows(rows, table)
            if todo.num_rows == 0 or attempt == RESCORE_PASSES:
                return table, stats
            logger.warning(
                "reference: %d rows' reports were lost with their scorer; scoring them again", todo.num_rows
            )
        raise AssertionError("unreachable")
    finally:
        ray.kill(collector)


def unscored_rows(rows: pa.Table, scored: pa.Table) -> pa.Table:
    """The rows of `rows` (in their order) whose row_id `scored` lacks."""
    import pyarrow.compute as pc

    done = scored.column("row_id").combine_chunks()
    return rows.filter(pc.invert(pc.is_in(rows.column("row_id"), value_set=done)))
