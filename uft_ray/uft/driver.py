"""The driver of `method: uft` (the offline losses): data plane -> reference -> plan -> Ray Train -> the run directory.

`run(cfg)` is what `uft_ray.driver.run` hands an offline config to (through the method registry,
uft_ray.uft.method). It prepares the rows (reused when already prepared for the same data config), makes sure the
reference cache holds their log-probs, makes the deterministic training plan, trains with `TorchTrainer` and the
per-worker loop of uft_ray.train.loop, and writes the run directory (uft_ray.run_dir names every file in it).

Feeding the workers. Every rank gets its own dataset `train_{rank}`, its plan rows in plan order
(uft_ray.train.feeds: one pass over the prepared rows for all ranks, one sort, split at the ranks' offsets, so
each rank holds about 1/W of the rows), with the reference log-probs joined from the cache by row id
(`uft_ray.data.prepared.join_columns`: the prepared rows are never rewritten, so runs can share them), read with
`preserve_order`. `DataConfig(datasets_to_split=[])` hands each dataset unsplit to every worker (Ray Train V2
creates a worker's iterator only for the dataset it asks for, so rank r executes only `train_r`). The loop
checks every micro-batch's plan position, so an ordering bug fails loudly instead of training wrong rows.

Resume. Rerunning with the same run name and storage path: Ray Train V2 hands the last checkpoint to every
worker; the driver also reads its step to build datasets that start there (`step >= k`), and after a worker
failure inside one `fit()` the loop skips the micro-batches before its restored step. `reference.run: stream`
appends the scorer after the sort, so reference forwards run only for rows that will be trained.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
from typing import Any

from uft_ray import storage
from uft_ray.config import Config, ConfigError
from uft_ray.console import say
from uft_ray.data import prepared as prep
from uft_ray.evaluation import heldout
from uft_ray.reference.cache import REFERENCE_FIELDS, as_lookup
from uft_ray.reference.fingerprint import tokenizer_identity
from uft_ray.reference.service import (
    attach_reference,
    new_collector,
    publish_stream_cache,
    read_reference,
    stream_stage,
)
from uft_ray.rerun import changes
from uft_ray.resources import TRAINING_DATA_CPUS
from uft_ray.run_dir import PREPARED_KEY, RunDir
from uft_ray.runner import (
    Run,
    RunResult,
    finish,
    fit,
    keep_plan,
    last_checkpoint,
    open_run,
    result,
    settle_packing,
    start_step,
)
from uft_ray.trackers import open_trackers
from uft_ray.train.feeds import Background, rank_feeds, table_feeds
from uft_ray.train.hooks import TrainHooks
from uft_ray.train.plan import Plan, make_plan, rank_assignment

__all__ = ["TRAIN_COLUMNS", "check_prepared_key", "join_reference", "prepare_key", "run", "target_fraction",
           "write_prepared_key"]  # fmt: skip

logger = logging.getLogger(__name__)

# Columns the workers read from the prepared rows: token ids, offsets and targets, never the text.
TRAIN_COLUMNS = (
    "row_id",
    "source",
    "kind",
    "score",
    "input_ids",
    "response_start",
    "length",
    "rejected_input_ids",
    "rejected_response_start",
    "rejected_length",
)


def run(cfg: Config, *, prepared_dir: str | None = None, hooks: TrainHooks | None = None) -> RunResult:
    """Train one offline run end to end and write its run directory; rerun the same config to resume.

    `prepared_dir`: rows already prepared for this config (`uft-ray prepare CONFIG --out DIR`), e.g. shared by
    the runs of a sweep, several at once: nothing here writes into it but the reference entry of its summary.
    By default the rows are prepared into `{run_dir}/prepared` (reused by a rerun with the same data config).
    `hooks`: callbacks every worker makes (uft_ray.train.hooks; the tests record and steer runs with them).
    """
    run_ = open_run(cfg)
    try:
        return _run(run_, prepared_dir, hooks)
    finally:
        run_.close()


def _run(run_: Run, prepared_dir: str | None, hooks: TrainHooks | None) -> RunResult:
    cfg, run_dir = run_.cfg, run_.dir

    # 1. Data plane (reused when already prepared for this data config).
    if prepared_dir is not None:
        check_prepared_key(cfg, prepared_dir)  # rows made for another tokenizer, max_len or mixture are refused
    prepared = prepared_dir or _prepare(cfg, run_dir, resuming=run_.resuming)
    summary, why = prep.read_summary(prepared), ""
    quarantined = summary.get("quarantine") or {}
    if quarantined:
        why = " (" + ", ".join(f"{reason} {n}" for reason, n in quarantined.items()) + ")"
    say(f"data: {summary.get('rows_out')} rows in {prepared}; quarantined {sum(quarantined.values())}{why}")

    # 2. The plan, and where a rerun resumes (a changed plan is refused before anything is written).
    last = last_checkpoint(run_dir)
    plan = _plan(cfg, prepared)
    cfg = settle_packing(run_, plan.summary.padding_frac)  # padded or packed, from the plan's padding
    keep_plan(run_, plan, last)
    start = start_step(last)
    say(f"plan: {plan.summary.steps} steps of {plan.summary.global_batch_size} rows; starting at step {start}")

    # 3. Each rank's rows in plan order, built on the cluster while the reference log-probs are looked up or
    # scored, and ready before the workers start: the first step waits for neither. If the reference pass
    # fails, the build is waited out and dropped, so nothing of this run is left working on the cluster.
    todo = start < plan.summary.steps
    building = Background(rank_feeds, prep.rows_dataset(prepared, list(TRAIN_COLUMNS)), plan, start) if todo else None
    try:
        reference, collector = _reference(cfg, prepared)
        if reference is not None:
            ref = prep.read_summary(prepared).get("reference") or {}
            say(f"reference log-probs: cache {ref.get('cache')}, {ref.get('rows_scored', 0)} rows scored")
        feeds = building.result() if building is not None else {}
    except BaseException:
        if building is not None:
            building.abandon()
        raise

    # 4. Train (a run already trained to its end has nothing to do), then the final adapter with its tokenizer and
    # the benchmarks; the trackers follow metrics.jsonl and get the benchmark results and the adapter before
    # they close.
    checkpoint = last
    with open_trackers(cfg, run_dir, start) if todo else contextlib.nullcontext() as tracked:
        if todo:
            from uft_ray.train.loop import train_loop_per_worker  # imports torch and DeepSpeed: only when training

            datasets = _with_reference(cfg, feeds, plan, start, reference, collector)
            datasets |= _heldout_feeds(cfg, run_dir, prepared, reference)  # held-out rows, every eval.every steps
            checkpoint = fit(cfg, run_dir, train_loop_per_worker, _loop_config(run_, plan, datasets, hooks), datasets)
        finish(run_, checkpoint, tracked)

    # 5. Outputs: stream cache, quarantine, report.
    if collector is not None:
        publish_stream_cache(cfg, prepared, collector)
    _copy_quarantine(prepared, run_dir)
    return result(run_, checkpoint, plan.summary.steps)


def target_fraction(cfg: Config, plan: Plan | None = None) -> dict[str, float]:
    """Each source's configured share of the rows (`mixture.counts` or `mixture.ratios`), normalized."""
    table = cfg.mixture.counts if cfg.mixture.counts is not None else cfg.mixture.ratios
    if not table and plan is not None:
        return dict(plan.summary.target_fraction)
    total = float(sum(table.values())) if table else 0.0
    return {s.name: (table or {}).get(s.name, 0) / total if total else 0.0 for s in cfg.data.sources}


# ---------------------------------------------------------------------------------------------------------
# Steps of `run`.


def prepare_key_inputs(cfg: Config) -> dict[str, Any]:
    """What the prepared rows depend on: the data, mixture and tokenization config (each source's kind among
    them) and the tokenizer, by its files' content (the same tokenizer path with other files makes other ids)."""
    d = cfg.to_dict()
    return {
        "data": d["data"],
        "mixture": d["mixture"],
        "tokenize": d["tokenize"],
        "tokenizer": tokenizer_identity(cfg),
    }


def prepare_key(cfg: Config, inputs: dict[str, Any] | None = None) -> str:
    key = inputs if inputs is not None else prepare_key_inputs(cfg)
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()


def write_prepared_key(cfg: Config, out: str, key_path: str | None = None) -> None:
    """The key of rows prepared for `cfg` into `out` (`{out}/prepared.key.json` unless given): its hash and the
    inputs it hashes, so that a run given other rows can name what differs."""
    inputs = prepare_key_inputs(cfg)
    storage.write_json(
        key_path or storage.join(out, PREPARED_KEY), {"key": prepare_key(cfg, inputs), "inputs": inputs}
    )


def check_prepared_key(cfg: Config, prepared_dir: str) -> None:
    """Refuse rows prepared for another config (`driver.run(cfg, prepared_dir=DIR)`), naming the fields that
    differ; rows without a key (prepared by an older version, or by `pipeline.prepare` itself) are trusted with a
    warning."""
    saved = storage.read_json(storage.join(prepared_dir, PREPARED_KEY))
    if not isinstance(saved, dict) or "inputs" not in saved:
        logger.warning("%s: no %s: cannot check that its rows were prepared for this config", prepared_dir,
                       PREPARED_KEY)  # fmt: skip
        return
    inputs = prepare_key_inputs(cfg)
    if saved.get("key") == prepare_key(cfg, inputs):
        return
    changed = changes(saved["inputs"], inputs) or [("(the key)", saved.get("key"), prepare_key(cfg, inputs))]
    raise ConfigError(
        [
            f"{k}: the rows in {prepared_dir} were prepared with {old!r}, this config has {new!r}"
            for k, old, new in changed
        ]
        + [
            f"{prepared_dir}: prepare rows for this config (uft-ray prepare CONFIG --out NEW_DIR) or train without "
            "prepared_dir"
        ]  # fmt: skip
    )


def _prepare(cfg: Config, run_dir: RunDir, *, resuming: bool = False) -> str:
    return _prepare_into(cfg, run_dir.prepared, run_dir.prepared_key, resuming=resuming)


def _prepare_into(cfg: Config, out: str, key_path: str, *, resuming: bool = False) -> str:
    """Rows prepared for `cfg` in `out`: reused when its key matches; else prepared afresh, except in a run that
    has trained on rows of another key (the same config with another tokenizer's files): that is refused, and
    the rows its checkpoints were trained on are left in place."""
    from uft_ray.data.pipeline import prepare  # imports Ray (Ray Data): only when rows are prepared

    key = prepare_key(cfg)
    saved = (storage.read_json(key_path) or {}).get("key")
    if prep.is_prepared(out) and saved == key:
        logger.info("reusing prepared rows in %s", out)
        return out
    if resuming and saved is not None and saved != key:
        raise ConfigError(
            [
                f"{out}: the run's checkpoints were trained on rows prepared with another tokenizer or data "
                f"(key {saved[:12]}, now {key[:12]}: the tokenizer's files or the data changed under the same "
                "config); use a new output.run_name, or remove the run directory to start over"
            ]
        )
    storage.remove_tree(out)
    prepare(cfg, out)
    write_prepared_key(cfg, out, key_path)
    return out


def _reference(cfg: Config, prepared: str) -> tuple[dict[str, tuple] | None, Any]:
    """The reference values to join into the feed ({row_id: (ref_logp, ref_logp_rejected)}), or for
    `run: stream` the collector the streaming scorers report to; (None, None) when the loss needs none."""
    if not cfg.reference_from_cache:
        return None, None
    entry = attach_reference(cfg, prepared)
    if entry.get("deferred"):
        return None, new_collector()
    row_ids = prep.read_rows(prepared, ["row_id"]).column("row_id").to_pylist()
    return as_lookup(read_reference(entry, row_ids)), None


def _plan(cfg: Config, prepared: str) -> Plan:
    """The deterministic plan over the prepared rows (`uft_ray.runner.keep_plan` holds a rerun to it)."""
    rows = prep.read_rows(prepared, ["row_id", "source", "length", "rejected_length"])
    if cfg.eval.holdout is not None:  # held-out rows never reach the plan (uft_ray.evaluation.heldout)
        ids = rows["row_id"].to_pylist()
        # Said before any work: a source too small for the fraction gets no held-out metrics (none: refused).
        for warning in heldout.check_holdout(ids, rows["source"].to_pylist(), cfg.eval.holdout, cfg.data.seed):
            logger.warning(warning)
        rows = rows.filter([not heldout.is_heldout(r, cfg.eval.holdout, cfg.data.seed) for r in ids])
    lengths = rows["length"].to_numpy(zero_copy_only=False)
    if "rejected_length" in rows.column_names and cfg.loss.type == "dpo":
        rejected = rows["rejected_length"].fill_null(0).to_numpy(zero_copy_only=False)
        lengths = lengths.clip(min=rejected)  # a pair costs its longer side
    tr = cfg.train
    plan = make_plan(
        rows["row_id"].to_pylist(),
        rows["source"].to_pylist(),
        lengths,
        num_workers=tr.num_workers,
        micro_batch_size=tr.micro_batch_size,
        grad_accum=tr.grad_accum,
        seed=tr.seed,
        epochs=tr.epochs,
        max_steps=tr.max_steps,
        group_by_length=tr.group_by_length,
    )
    return plan


def _loop_config(run_: Run, plan: Plan, datasets: dict[str, Any], hooks: TrainHooks | None) -> dict[str, Any]:
    """What every worker's `train_loop_per_worker` gets (uft_ray.train.loop)."""
    cfg = run_.cfg
    return {
        "cfg": cfg.to_dict(),
        "run_dir": run_.dir.path,
        "steps": plan.summary.steps,
        "sources": [s.name for s in cfg.data.sources],
        "target_fraction": target_fraction(cfg, plan),
        "pad_id": run_.pad_id,
        "hooks": hooks or TrainHooks(),
        "heldout": any(name.startswith("eval_") for name in datasets),
    }


def join_reference(batch: Any, values: dict[str, tuple]) -> Any:
    """A `map_batches` function: the reference log-probs joined into a block of the feed by row_id."""
    return prep.join_columns(batch, values, REFERENCE_FIELDS)


def _with_reference(
    cfg: Config,
    feeds: dict[str, Any],
    plan: Plan,
    start: int,
    reference: dict[str, tuple] | None,
    collector: Any,
) -> dict[str, Any]:
    """The trainer's datasets: each feed with its reference log-probs, joined from the cache (only this rank's
    rows' values travel with its tasks) or scored as it streams (`reference.run: stream`)."""
    datasets = {}
    for rank in range(cfg.train.num_workers):
        ds = feeds[f"train_{rank}"]
        if reference is not None:
            ids = rank_assignment(plan.table, rank, start)
            ds = ds.map_batches(
                join_reference,
                fn_kwargs={"values": {rid: reference[rid] for rid in ids}},
                batch_format="pyarrow",
                batch_size=None,
                num_cpus=TRAINING_DATA_CPUS,  # runs while training: the share the workers leave (resources.py)
            )
        elif collector is not None:
            ds = stream_stage(ds, cfg, collector=collector)
        datasets[f"train_{rank}"] = ds
    return datasets


def _heldout_feeds(cfg: Config, run_dir: RunDir, prepared: str, reference: dict[str, tuple] | None) -> dict[str, Any]:
    """`eval_{rank}`: each rank's share of the held-out rows (uft_ray.evaluation.heldout), with their reference
    log-probs from the same cache as the training rows; none without `eval.sources` / `eval.holdout`."""
    if not cfg.eval.heldout:
        return {}
    if cfg.eval.sources:  # each source's own split, prepared like the training rows
        eval_cfg = heldout.eval_prepare_config(cfg)
        source_dir = _prepare_into(eval_cfg, run_dir.prepared_eval, run_dir.prepared_eval_key)
        reference, _ = _reference(eval_cfg, source_dir)
        row_ids = prep.read_rows(source_dir, ["row_id"]).column("row_id").to_pylist()
    else:  # the seeded fraction the plan left out
        source_dir = prepared
        rows = prep.read_rows(prepared, ["row_id", "source"])
        row_ids = heldout.holdout_rows(
            rows["row_id"].to_pylist(), rows["source"].to_pylist(), cfg.eval.holdout, cfg.data.seed, cfg.eval.max_rows
        )
    logger.info("held-out rows: %d, evaluated every %s steps", len(row_ids), cfg.eval.every or "(end only)")
    if not row_ids:  # eval.holdout is refused earlier (heldout.check_holdout); an empty split is refused here
        raise ConfigError([f"eval.sources: the splits hold no usable rows (prepared in {source_dir})"])
    # Each rank's share (heldout.rank_share) in order, from one pass over the rows like the training feeds, with
    # the held-out rows' reference log-probs joined before the sort.
    join = None
    if reference is not None:
        join = functools.partial(join_reference, values={rid: reference[rid] for rid in row_ids})
    return table_feeds(
        prep.rows_dataset(source_dir, list(TRAIN_COLUMNS)),
        heldout.heldout_plan(row_ids, cfg.train.num_workers),
        cfg.train.num_workers,
        prefix="eval_",
        transform=join,
    )


def _copy_quarantine(prepared: str, run_dir: RunDir) -> None:
    src = prep.quarantine_dir(prepared)
    if storage.is_dir(src):
        storage.copy_tree(src, run_dir.quarantine)
    else:
        storage.remove_tree(run_dir.quarantine)
        storage.makedirs(run_dir.quarantine)
    counts = (storage.read_json(prep.summary_path(prepared)) or {}).get("quarantine", {})
    storage.write_json(run_dir.quarantine_counts, counts, sort_keys=True)
