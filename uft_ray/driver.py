"""The job's driver: data plane -> reference -> plan -> Ray Train -> the run directory of DESIGN.md.

`run(cfg)` is what `uft-ray train`, `uft_ray.run(...)` and `jobs/train.py` call. It connects to the running Ray
cluster (or starts a local one), prepares the rows (reused when already prepared for the same data config),
makes sure the reference cache holds their log-probs, makes the deterministic training plan, trains with
`TorchTrainer`, and writes the run directory (uft_ray.run_dir names every file in it).

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
import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from uft_ray import storage
from uft_ray.config import Config, ConfigError, validate
from uft_ray.data import prepared as prep
from uft_ray.model_store import local_model
from uft_ray.ray_utils import init_ray, train_logging
from uft_ray.resources import check_cluster
from uft_ray.run_dir import CHECKPOINT_ADAPTER, CHECKPOINTS, QUARANTINE_COUNTS, RunDir, read_state
from uft_ray.trackers import open_trackers
from uft_ray.train.feeds import Background, rank_feeds
from uft_ray.train.hooks import TrainHooks
from uft_ray.train.plan import Plan, load_plan, make_plan, rank_assignment, tag_rows

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


@dataclass
class RunResult:
    run_dir: str
    adapter_dir: str
    metrics_path: str
    metrics: dict[str, Any]  # the last metrics.jsonl line
    checkpoint_dir: str | None  # the last Ray Train checkpoint
    steps: int
    plan_path: str
    report_path: str | None


def run(cfg: Config, *, prepared_dir: str | None = None, hooks: TrainHooks | None = None) -> RunResult:
    """Train one run end to end and write its run directory; rerun the same config to resume.

    `prepared_dir`: rows already prepared for this config (`uft-ray prepare CONFIG --out DIR`), e.g. shared by
    the runs of a sweep, several at once: nothing here writes into it but the reference entry of its summary.
    By default the rows are prepared into `{run_dir}/prepared` (reused by a rerun with the same data config).
    `hooks`: callbacks every worker makes (uft_ray.train.hooks; the tests record and steer runs with them).
    """
    if cfg.method == "hint_rft":  # the online method: prompts, rollout actors, GRPO + hint NLL
        from uft_ray.rft.driver import run as run_hint_rft

        return run_hint_rft(cfg, hooks=hooks)
    from transformers import AutoTokenizer

    run_dir = RunDir(cfg.output.run_dir)
    storage.makedirs(run_dir.path)
    storage.atomic_write(run_dir.config, cfg.to_yaml().encode())
    logger.info("uft-ray run %s, resolved config:\n%s", run_dir.path, cfg.to_yaml())
    from uft_ray.evaluation.heldout import check_benchmarks, run_benchmarks

    check_benchmarks(cfg)  # an unknown eval.tasks name fails now, not after training
    init_ray(cfg.ray, num_cpus=_local_cpus(cfg))
    cfg = _with_worker_cpus(cfg)
    check_cluster(cfg)  # a cluster that can never hold the run fails now, not in a silent hang
    tokenizer = AutoTokenizer.from_pretrained(local_model(cfg.model.path, weights=False), revision=cfg.model.revision)

    # 1. Data plane (reused when already prepared for this data config).
    prepared = prepared_dir or _prepare(cfg, run_dir)
    summary, why = prep.read_summary(prepared), ""
    quarantined = summary.get("quarantine") or {}
    if quarantined:
        why = " (" + ", ".join(f"{reason} {n}" for reason, n in quarantined.items()) + ")"
    _say(f"data: {summary.get('rows_out')} rows in {prepared}; quarantined {sum(quarantined.values())}{why}")

    # 2. The plan, and where a rerun resumes.
    plan = _plan(cfg, prepared, run_dir)
    last = _last_checkpoint(run_dir)
    start = int(read_state(last)["step"]) if last else 0
    _say(f"plan: {plan.summary.steps} steps of {plan.summary.global_batch_size} rows; starting at step {start}")

    # 3. Each rank's rows in plan order, built on the cluster while the reference log-probs are looked up or
    # scored, and ready before the workers start: the first step waits for neither.
    todo = start < plan.summary.steps
    rows = prep.rows_dataset(prepared, list(TRAIN_COLUMNS))
    building = Background(rank_feeds, rows, plan, start) if todo else None
    reference, collector = _reference(cfg, prepared)
    if reference is not None:
        ref = prep.read_summary(prepared).get("reference") or {}
        _say(f"reference log-probs: cache {ref.get('cache')}, {ref.get('rows_scored', 0)} rows scored")
    feeds = building.result() if building is not None else {}

    # 4. Train (a run already trained to its end has nothing to do), then the final adapter with its tokenizer and
    # the benchmarks (eval.tasks with lm_eval, into {run_dir}/eval); the trackers follow metrics.jsonl and get the
    # benchmark results and the adapter before they close.
    checkpoint = last
    with open_trackers(cfg, run_dir, start) if todo else contextlib.nullcontext() as tracked:
        if todo:
            datasets = _with_reference(cfg, feeds, plan, start, reference, collector)
            datasets |= _heldout_feeds(cfg, run_dir, prepared, reference)  # held-out rows, every eval.every steps
            checkpoint = _fit(cfg, run_dir, plan, datasets, tokenizer, hooks or TrainHooks())
        if checkpoint:
            write_adapter(checkpoint, run_dir, tokenizer)
            run_benchmarks(cfg, run_dir.path)
            if tracked is not None:
                tracked.adapter = run_dir.adapter

    # 5. Outputs: stream cache, quarantine, report.
    if collector is not None:
        from uft_ray.reference.service import publish_stream_cache

        publish_stream_cache(cfg, prepared, collector)
    _copy_quarantine(prepared, run_dir)
    return RunResult(
        run_dir=run_dir.path,
        adapter_dir=run_dir.adapter,
        metrics_path=run_dir.metrics,
        metrics=run_dir.last_metrics(),
        checkpoint_dir=checkpoint,
        steps=plan.summary.steps,
        plan_path=run_dir.plan,
        report_path=_write_report(run_dir),
    )


def run_sequential(stage1: Config, stage2: Config, *, hooks: TrainHooks | None = None) -> tuple[RunResult, RunResult]:
    """The paper's sequential baselines: stage 1 (e.g. `sft` on UltraChat), then stage 2 (`dpo` / `kto` / `uft`
    on HelpSteer2) continuing stage 1's adapter, against the reference base + stage-1 adapter.
    """
    if stage2.reference.mode != "actor" and stage2.needs_reference:
        raise ConfigError(
            ["reference.mode: stage 2's reference is base + stage-1 adapter; use actor (adapter_off is the bare base)"]
        )
    first = run(stage1, hooks=hooks)
    stage2 = copy.deepcopy(stage2)
    stage2.model.adapter = first.adapter_dir
    stage2.reference.adapter = first.adapter_dir
    problems = validate(stage2, check_paths=False)
    if problems:
        raise ConfigError(problems)
    return first, run(stage2, hooks=hooks)


def target_fraction(cfg: Config, plan: Plan | None = None) -> dict[str, float]:
    """Each source's configured share of the rows (`mixture.counts` or `mixture.ratios`), normalized."""
    table = cfg.mixture.counts if cfg.mixture.counts is not None else cfg.mixture.ratios
    if not table and plan is not None:
        return dict(plan.summary.target_fraction)
    total = float(sum(table.values())) if table else 0.0
    return {s.name: (table or {}).get(s.name, 0) / total if total else 0.0 for s in cfg.data.sources}


# ---------------------------------------------------------------------------------------------------------
# Steps of `run`.


def _say(msg: str) -> None:
    """One line per phase on stdout (a job's log), beside the CLI's one line per step."""
    print(f"[uft-ray] {msg}", flush=True)


def _auto_cpus_per_worker(num_workers: int) -> int:
    """`train.cpus_per_worker: auto` on one machine: its cores shared by the workers (a laptop, the demo)."""
    return max(1, (os.cpu_count() or 1) // num_workers)


def _local_cpus(cfg: Config) -> int:
    """Logical CPUs for a local cluster: workers + reference actors + data tasks must be schedulable at once."""
    r, tr = cfg.reference, cfg.train
    if cfg.method == "hint_rft":  # rollout actors instead of reference actors
        actors, per_actor = cfg.rft.rollout.actors, cfg.rft.rollout.cpus_per_actor
    else:
        actors, per_actor = (max(r.actors) if isinstance(r.actors, list) else r.actors), r.cpus_per_actor
    per_worker = _auto_cpus_per_worker(tr.num_workers) if tr.cpus_per_worker == "auto" else tr.cpus_per_worker
    needed = tr.num_workers * per_worker + actors * per_actor + 2
    return max(os.cpu_count() or 1, int(needed + 0.999))


def _with_worker_cpus(cfg: Config) -> Config:
    """`cfg` with `train.cpus_per_worker: auto` made a number: on a one-node CPU cluster (a laptop, the demo)
    the cores the workers can share, so each worker computes with that many threads; elsewhere 1 (GPU workers
    spend their CPU on feeding, and a multi-node cluster's node sizes are the launcher's business)."""
    if cfg.train.cpus_per_worker != "auto":
        return cfg
    import ray

    from uft_ray.resources import DATA_CPUS

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = 1
    if not cfg.train.use_gpu and len(nodes) == 1:
        # The cores' share, but no more than the cluster holds beside the actors that train alongside (hint_rft's
        # rollout actors) and a CPU for data tasks: a 4-CPU head runs the 2-worker demo at 1 CPU each, not 2.
        beside = cfg.rft.rollout.actors * cfg.rft.rollout.cpus_per_actor if cfg.method == "hint_rft" else 0
        fit = int((ray.cluster_resources().get("CPU", 0) - beside - DATA_CPUS) // cfg.train.num_workers)
        cpus = max(1, min(_auto_cpus_per_worker(cfg.train.num_workers), fit))
    out = copy.deepcopy(cfg)
    out.train.cpus_per_worker = float(cpus)
    logger.info("train.cpus_per_worker auto: %d per worker", cpus)
    return out


def _prepare_key(cfg: Config) -> str:
    """What the prepared rows depend on: the data, mixture and tokenization config and the tokenizer."""
    key = {
        "data": cfg.to_dict()["data"],
        "mixture": cfg.to_dict()["mixture"],
        "tokenize": cfg.to_dict()["tokenize"],
        "model": [cfg.model.path, cfg.model.revision],
    }
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _prepare(cfg: Config, run_dir: RunDir) -> str:
    return _prepare_into(cfg, run_dir.prepared, run_dir.prepared_key)


def _prepare_into(cfg: Config, out: str, key_path: str) -> str:
    from uft_ray.data.pipeline import prepare

    key = _prepare_key(cfg)
    if prep.is_prepared(out) and (storage.read_json(key_path) or {}).get("key") == key:
        logger.info("reusing prepared rows in %s", out)
        return out
    storage.remove_tree(out)
    prepare(cfg, out)
    storage.write_json(key_path, {"key": key})
    return out


def _reference(cfg: Config, prepared: str) -> tuple[dict[str, tuple] | None, Any]:
    """The reference values to join into the feed ({row_id: (ref_logp, ref_logp_rejected)}), or for
    `run: stream` the collector the streaming scorers report to; (None, None) when the loss needs none."""
    if not cfg.needs_reference or cfg.reference.mode != "actor":
        return None, None
    from uft_ray.reference.cache import as_lookup
    from uft_ray.reference.service import attach_reference, new_collector, read_reference

    entry = attach_reference(cfg, prepared)
    if entry.get("deferred"):
        return None, new_collector()
    row_ids = prep.read_rows(prepared, ["row_id"]).column("row_id").to_pylist()
    return as_lookup(read_reference(entry, row_ids)), None


def _plan(cfg: Config, prepared: str, run_dir: RunDir) -> Plan:
    """Make the plan; a rerun must find the same one (else the checkpoints belong to another plan)."""
    rows = prep.read_rows(prepared, ["row_id", "source", "length", "rejected_length"])
    if cfg.eval.holdout is not None:  # held-out rows never reach the plan (uft_ray.evaluation.heldout)
        from uft_ray.evaluation.heldout import is_heldout

        keep = [not is_heldout(r, cfg.eval.holdout, cfg.data.seed) for r in rows["row_id"].to_pylist()]
        rows = rows.filter(keep)
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
    if storage.is_file(run_dir.plan) and _last_checkpoint(run_dir):
        saved = load_plan(run_dir.plan)
        if saved.summary.fingerprint != plan.summary.fingerprint:
            raise ConfigError(
                [
                    f"{run_dir.path}: the data or batch config changed since its checkpoints were written; "
                    "use a new output.run_name, or remove checkpoints/ to start over"
                ]
            )
    plan.save(run_dir.plan)
    return plan


def _fit(
    cfg: Config, run_dir: RunDir, plan: Plan, datasets: dict[str, Any], tokenizer: Any, hooks: TrainHooks
) -> str | None:
    """Run `TorchTrainer` over the per-rank datasets; returns the last checkpoint's path."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from uft_ray.train.loop import train_loop_per_worker

    tr = cfg.train
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "run_dir": run_dir.path,
            "steps": plan.summary.steps,
            "sources": [s.name for s in cfg.data.sources],
            "target_fraction": target_fraction(cfg, plan),
            "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            "hooks": hooks,
            "heldout": any(name.startswith("eval_") for name in datasets),
        },
        scaling_config=ScalingConfig(
            num_workers=tr.num_workers,
            use_gpu=tr.use_gpu,
            resources_per_worker={"CPU": tr.cpus_per_worker} | ({"GPU": tr.gpus_per_worker} if tr.use_gpu else {}),
        ),
        run_config=RunConfig(
            name=CHECKPOINTS,
            # Checkpoints land in {run_dir}/checkpoints/checkpoint_{step}; Ray Train uploads them when the run
            # directory is in object storage (the workers' nodes share no disk).
            storage_path=run_dir.path,
            failure_config=FailureConfig(max_failures=tr.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            logging_config=train_logging(),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
    )
    result = trainer.fit()
    return storage.as_uri(run_dir.path, result.checkpoint.path) if result.checkpoint is not None else None


def join_reference(batch: Any, values: dict[str, tuple]) -> Any:
    """A `map_batches` function: the reference log-probs joined into a block of the feed by row_id."""
    from uft_ray.reference.cache import REFERENCE_FIELDS

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
            )
        elif collector is not None:
            from uft_ray.reference.service import stream_stage

            ds = stream_stage(ds, cfg, collector=collector)
        datasets[f"train_{rank}"] = ds
    return datasets


def _heldout_feeds(cfg: Config, run_dir: RunDir, prepared: str, reference: dict[str, tuple] | None) -> dict[str, Any]:
    """`eval_{rank}`: each rank's share of the held-out rows (uft_ray.evaluation.heldout), with their reference
    log-probs from the same cache as the training rows; none without `eval.sources` / `eval.holdout`."""
    if not cfg.eval.heldout:
        return {}
    from uft_ray.evaluation import heldout

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
    base = prep.rows_dataset(source_dir, list(TRAIN_COLUMNS))
    feeds = {}
    for rank in range(cfg.train.num_workers):
        share = heldout.rank_share(row_ids, rank, cfg.train.num_workers)
        ds = base.map_batches(
            tag_rows,
            fn_kwargs={"assignment": {rid: [(0, 0, 0, k)] for k, rid in enumerate(share)}},
            batch_format="pyarrow",
            batch_size=None,
        )
        if reference is not None:
            ds = ds.map_batches(
                join_reference,
                fn_kwargs={"values": {rid: reference[rid] for rid in share}},
                batch_format="pyarrow",
                batch_size=None,
            )
        feeds[f"eval_{rank}"] = ds.materialize()
    return feeds


def _last_checkpoint(run_dir: RunDir) -> str | None:
    """The last checkpoint Ray Train committed for this run (what a rerun resumes from), or None."""
    _, files = storage.list_files(run_dir.checkpoints)
    if not any("/checkpoint_" in f for f in files):
        return None
    from ray.train import Result

    try:
        result = Result.from_path(run_dir.checkpoints)
    except Exception as e:  # no snapshot yet: Ray Train would start from scratch too
        logger.info("no committed checkpoint in %s (%s)", run_dir.checkpoints, e)
        return None
    return storage.as_uri(run_dir.path, result.checkpoint.path) if result.checkpoint is not None else None


def write_adapter(checkpoint: str, run_dir: RunDir, tokenizer: Any) -> None:
    """`{run_dir}/adapter`: the checkpoint's LoRA adapter with the tokenizer (peft's loadable layout)."""
    with storage.local_dir(run_dir.adapter) as out:
        storage.copy_tree(storage.join(checkpoint, CHECKPOINT_ADAPTER), out)
        tokenizer.save_pretrained(out)


def _copy_quarantine(prepared: str, run_dir: RunDir) -> None:
    src = prep.quarantine_dir(prepared)
    if storage.is_dir(src):
        storage.copy_tree(src, run_dir.quarantine)
    else:
        storage.remove_tree(run_dir.quarantine)
        storage.makedirs(run_dir.quarantine)
    counts = (storage.read_json(prep.summary_path(prepared)) or {}).get("quarantine", {})
    storage.write_json(os.path.join(run_dir.quarantine, QUARANTINE_COUNTS), counts, sort_keys=True)


def _write_report(run_dir: RunDir) -> str | None:
    from uft_ray.report import write_report

    try:
        return write_report(run_dir.path)
    except Exception as e:  # the run itself succeeded; `uft-ray report RUN_DIR` can rebuild it
        logger.warning("could not write the report: %s", e)
        return None
