"""The job's driver: data plane -> reference -> plan -> Ray Train -> the run directory of DESIGN.md.

`run(cfg)` is what `uft-ray train`, `uft_ray.run(...)` and `jobs/train.py` call. It connects to the running Ray
cluster (or starts a local one), prepares the rows (reused when already prepared for the same data config),
attaches the reference log-probs, makes the deterministic training plan, trains with `TorchTrainer`, and
writes `{storage_path}/{run_name}/`: config.yaml, prepared/, plan.parquet, metrics.jsonl (rank 0 writes it),
checkpoints/, quarantine/, adapter/ (peft format, tokenizer beside it) and report.html.

Feeding the workers. Ray Data's `streaming_split` hands blocks to whichever rank asks first, so which rank
trains which row, and in what order, changes from run to run: no exact resume. Instead every rank gets its own
dataset `train_{rank}`: the prepared rows, tagged with their plan position by a `map_batches` join against
this rank's share of the plan (a small dict), filtered to it, sorted by (step, micro, slot), and read with
`preserve_order`. `DataConfig(datasets_to_split=[])` hands each dataset unsplit to every worker (Ray Train V2
creates a worker's iterator only for the dataset it asks for, so rank r executes only `train_r`). The loop
checks every micro-batch's plan position, so an ordering bug fails loudly instead of training wrong rows.

Resume. Rerunning with the same run name and storage path: Ray Train V2 hands the last checkpoint to every
worker; the driver also reads its step to build datasets that start there (`step >= k`), and after a worker
failure inside one `fit()` the loop skips the micro-batches before its restored step. `reference.run: stream`
appends the scorer after the sort, so reference forwards run only for rows that will be trained.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any

from uft_ray.config import Config, ConfigError, validate
from uft_ray.ray_utils import init_ray
from uft_ray.train.plan import Plan, load_plan, make_plan, rank_assignment, tag_rows

logger = logging.getLogger(__name__)
SORT_PARTITION_ROWS = 4096  # rows per sorted partition of a rank's dataset

CHECKPOINTS = "checkpoints"
PREPARED = "prepared"
PREPARED_KEY = "prepared.key.json"
PLAN_FILE = "plan.parquet"
# Columns the workers read: token ids, offsets, targets and reference log-probs, never the text.
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
    "ref_logp",
    "ref_logp_rejected",
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


def run(cfg: Config, *, prepared_dir: str | None = None, debug: dict[str, Any] | None = None) -> RunResult:
    """Train one run end to end and write its run directory; rerun the same config to resume.

    `prepared_dir`: rows already prepared for this config (`uft-ray prepare CONFIG --out DIR`), e.g. shared by
    the runs of a sweep; the reference columns are (re)attached to it, so one run at a time per directory.
    By default the rows are prepared into `{run_dir}/prepared` (reused by a rerun with the same data config).
    `debug` is for the integration tests (`{"record": True}` records consumed rows and parameter digests under
    `run_dir/debug/`; `{"stop_after_step": k}` makes the workers fail after step k; `{"pause": {"rank": r,
    "step": k}}` parks rank r after step k once, writing its pid, for a test to kill it).
    """
    from transformers import AutoTokenizer

    from uft_ray.train.loop import METRICS_FILE

    run_dir = cfg.output.run_dir
    os.makedirs(run_dir, exist_ok=True)
    cfg.save(os.path.join(run_dir, "config.yaml"))
    logger.info("uft-ray run %s, resolved config:\n%s", run_dir, cfg.to_yaml())
    init_ray(cfg.ray, num_cpus=_local_cpus(cfg))
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, revision=cfg.model.revision)

    # 1. Data plane, then reference log-probs (both reused when already done for this config).
    prepared = prepared_dir or _prepare(cfg, run_dir)
    collector = _attach_reference(cfg, prepared)

    # 2. The plan, and where a rerun resumes.
    plan = _plan(cfg, prepared, run_dir)
    last = _last_checkpoint(run_dir)
    start = _checkpoint_step(last) if last else 0
    logger.info(
        "plan: %d steps of %d rows; starting at step %d", plan.summary.steps, plan.summary.global_batch_size, start
    )

    # 3. Train: one ordered dataset per rank, then Ray Train (a run already trained to its end has nothing to do).
    checkpoint = last
    if start < plan.summary.steps:
        checkpoint = _fit(cfg, prepared, plan, start, collector, tokenizer, debug)

    # 4. Outputs: stream cache, quarantine, final adapter with tokenizer, report.
    if collector is not None:
        from uft_ray.reference import publish_stream_cache

        publish_stream_cache(cfg, prepared, collector)
    _copy_quarantine(prepared, run_dir)
    adapter_dir = os.path.join(run_dir, "adapter")
    if checkpoint:
        shutil.rmtree(adapter_dir, ignore_errors=True)
        shutil.copytree(os.path.join(checkpoint, "adapter"), adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
    metrics_path = os.path.join(run_dir, METRICS_FILE)
    return RunResult(
        run_dir=run_dir,
        adapter_dir=adapter_dir,
        metrics_path=metrics_path,
        metrics=_last_line(metrics_path),
        checkpoint_dir=checkpoint,
        steps=plan.summary.steps,
        plan_path=os.path.join(run_dir, PLAN_FILE),
        report_path=_write_report(run_dir),
    )


def run_sequential(
    stage1: Config, stage2: Config, *, debug: dict[str, Any] | None = None
) -> tuple[RunResult, RunResult]:
    """The paper's sequential baselines: stage 1 (e.g. `sft` on UltraChat), then stage 2 (`dpo` / `kto` / `uft`
    on HelpSteer2) continuing stage 1's adapter, against the reference base + stage-1 adapter.
    """
    if stage2.reference.mode != "actor" and stage2.needs_reference:
        raise ConfigError(
            ["reference.mode: stage 2's reference is base + stage-1 adapter; use actor (adapter_off is the bare base)"]
        )
    first = run(stage1, debug=debug)
    stage2 = copy.deepcopy(stage2)
    stage2.model.adapter = first.adapter_dir
    stage2.reference.adapter = first.adapter_dir
    problems = validate(stage2, check_paths=False)
    if problems:
        raise ConfigError(problems)
    return first, run(stage2, debug=debug)


def target_fraction(cfg: Config, plan: Plan | None = None) -> dict[str, float]:
    """Each source's configured share of the rows (`mixture.counts` or `mixture.ratios`), normalized."""
    table = cfg.mixture.counts if cfg.mixture.counts is not None else cfg.mixture.ratios
    if not table and plan is not None:
        return dict(plan.summary.target_fraction)
    total = float(sum(table.values())) if table else 0.0
    return {s.name: (table or {}).get(s.name, 0) / total if total else 0.0 for s in cfg.data.sources}


# ---------------------------------------------------------------------------------------------------------
# Steps of `run`.


def _local_cpus(cfg: Config) -> int:
    """Logical CPUs for a local cluster: workers + reference actors + data tasks must be schedulable at once."""
    r = cfg.reference
    actors = max(r.actors) if isinstance(r.actors, list) else r.actors
    needed = cfg.train.num_workers * cfg.train.cpus_per_worker + actors * r.cpus_per_actor + 2
    return max(os.cpu_count() or 1, int(needed + 0.999))


def _prepare_key(cfg: Config) -> str:
    """What the prepared rows depend on: the data, mixture and tokenization config and the tokenizer."""
    key = {
        "data": cfg.to_dict()["data"],
        "mixture": cfg.to_dict()["mixture"],
        "tokenize": cfg.to_dict()["tokenize"],
        "model": [cfg.model.path, cfg.model.revision],
    }
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _prepare(cfg: Config, run_dir: str) -> str:
    from uft_ray.data.pipeline import prepare

    prepared = os.path.join(run_dir, PREPARED)
    key_path = os.path.join(run_dir, PREPARED_KEY)
    key = _prepare_key(cfg)
    if os.path.exists(os.path.join(prepared, "summary.json")) and _read_json(key_path).get("key") == key:
        logger.info("reusing prepared rows in %s", prepared)
        return prepared
    shutil.rmtree(prepared, ignore_errors=True)
    prepare(cfg, prepared)
    with open(key_path, "w") as f:
        json.dump({"key": key}, f)
    return prepared


def _attach_reference(cfg: Config, prepared: str) -> Any:
    """Precompute (or read from cache) the reference columns; for `run: stream` return the cache collector."""
    if not cfg.needs_reference or cfg.reference.mode != "actor":
        return None
    from uft_ray.reference import attach_reference, new_collector

    entry = attach_reference(cfg, prepared)
    return new_collector() if entry.get("deferred") else None


def _plan(cfg: Config, prepared: str, run_dir: str) -> Plan:
    """Make the plan; a rerun must find the same one (else the checkpoints belong to another plan)."""
    from uft_ray.data.pipeline import read_prepared

    rows = read_prepared(prepared, ["row_id", "source", "length", "rejected_length"])
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
    path = os.path.join(run_dir, PLAN_FILE)
    if os.path.exists(path) and _last_checkpoint(run_dir):
        saved = load_plan(path)
        if saved.summary.fingerprint != plan.summary.fingerprint:
            raise ConfigError(
                [
                    f"{run_dir}: the data or batch config changed since its checkpoints were written; "
                    "use a new output.run_name, or remove checkpoints/ to start over"
                ]
            )
    plan.save(path)
    return plan


def _fit(
    cfg: Config, prepared: str, plan: Plan, start: int, collector: Any, tokenizer: Any, debug: dict[str, Any] | None
) -> str | None:
    """Run `TorchTrainer` over the per-rank datasets; returns the last checkpoint's path."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from uft_ray.train.loop import train_loop_per_worker

    run_dir = cfg.output.run_dir
    tr = cfg.train
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "run_dir": run_dir,
            "steps": plan.summary.steps,
            "sources": [s.name for s in cfg.data.sources],
            "target_fraction": target_fraction(cfg, plan),
            "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            "debug": debug or {},
        },
        scaling_config=ScalingConfig(
            num_workers=tr.num_workers,
            use_gpu=tr.use_gpu,
            resources_per_worker={"CPU": tr.cpus_per_worker} | ({"GPU": tr.gpus_per_worker} if tr.use_gpu else {}),
        ),
        run_config=RunConfig(
            name=CHECKPOINTS,
            storage_path=run_dir,  # so checkpoints land in {run_dir}/checkpoints/checkpoint_{step}
            failure_config=FailureConfig(max_failures=tr.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
        datasets=_rank_datasets(cfg, prepared, plan, start, collector),
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
    )
    result = trainer.fit()
    return result.checkpoint.path if result.checkpoint is not None else None


def _rank_datasets(cfg: Config, prepared: str, plan: Plan, start: int, collector: Any) -> dict[str, Any]:
    from uft_ray.data.pipeline import prepared_dataset

    base = prepared_dataset(prepared)
    # Token ids, offsets, targets and reference log-probs only: the text columns are not read.
    base = base.select_columns([c for c in TRAIN_COLUMNS if c in base.schema().names])
    # Sort partitions cut at known steps: no sampling pass, and a handful of partitions instead of Ray's 200.
    per_rank_step = cfg.train.micro_batch_size * cfg.train.grad_accum
    every = max(1, SORT_PARTITION_ROWS // per_rank_step)
    boundaries = list(range(start + every, plan.summary.steps, every)) or [plan.summary.steps]
    datasets = {}
    for rank in range(cfg.train.num_workers):
        ds = base.map_batches(
            tag_rows,
            fn_kwargs={"assignment": rank_assignment(plan.table, rank, start)},
            batch_format="pyarrow",
            batch_size=None,
        ).sort(["step", "micro", "slot"], boundaries=boundaries)
        if collector is not None:
            from uft_ray.reference import stream_stage

            ds = stream_stage(ds, cfg, collector=collector)
        datasets[f"train_{rank}"] = ds
    return datasets


def _last_checkpoint(run_dir: str) -> str | None:
    """The last checkpoint Ray Train committed for this run (what a rerun resumes from), or None."""
    path = os.path.join(run_dir, CHECKPOINTS)
    if not glob.glob(os.path.join(path, "checkpoint_*")):
        return None
    from ray.train import Result

    try:
        result = Result.from_path(path)
    except Exception as e:  # no snapshot yet: Ray Train would start from scratch too
        logger.info("no committed checkpoint in %s (%s)", path, e)
        return None
    return result.checkpoint.path if result.checkpoint is not None else None


def _checkpoint_step(checkpoint: str) -> int:
    from uft_ray.train.loop import STATE_FILE

    return int(_read_json(os.path.join(checkpoint, STATE_FILE))["step"])


def _copy_quarantine(prepared: str, run_dir: str) -> None:
    src, dst = os.path.join(prepared, "quarantine"), os.path.join(run_dir, "quarantine")
    shutil.rmtree(dst, ignore_errors=True)
    if os.path.isdir(src):
        shutil.copytree(src, dst)
    else:
        os.makedirs(dst)
    counts = _read_json(os.path.join(prepared, "summary.json")).get("quarantine", {})
    with open(os.path.join(dst, "counts.json"), "w") as f:
        json.dump(counts, f, indent=1, sort_keys=True)


def _write_report(run_dir: str) -> str | None:
    try:
        from uft_ray.report import write_report
    except ImportError:
        return None
    try:
        return write_report(run_dir)
    except Exception as e:  # the run itself succeeded; `uft-ray report RUN_DIR` can rebuild it
        logger.warning("could not write the report: %s", e)
        return None


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _last_line(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    return json.loads(lines[-1]) if lines else {}
