"""A run of either method, from its header to its outputs: the parts the two drivers share.

torchtune's split: each method's driver (uft_ray.uft.driver for the offline losses, uft_ray.rft.driver for
hint_rft, found through uft_ray.methods) owns its own steps and reads top to bottom; this module owns the small parts both call, by public
names:

- `open_run`: the header. Connect to Ray (or start a local one sized by uft_ray.resources) with Ray's own
  output sent to the run's `ray.log` (a local copy uploaded at the end when the run directory is a URI), resolve
  `train.cpus_per_worker: auto` (and first the method's own `auto` values, `Method.resolve`: hint_rft's
  `rft.rollout.backend`), once, run the resource pre-check, check the benchmark names, check that the packages the
  backends import (vllm, lm_eval) are on the nodes that will import them (uft_ray.preflight), load the tokenizer;
  before any data or cluster work.
  Before any of that: a rerun that would resume trained work with another config is refused (uft_ray.rerun), and
  the run directory's lease is taken (uft_ray.lease: a second live driver is refused); `Run.close` ends it.
- `last_checkpoint`: where a rerun resumes. Only "there is no checkpoint" means step 0; anything else (auth,
  network, a damaged snapshot) fails naming the run directory, since Ray Train may still restore from it.
- `keep_plan`: the plan-reuse rule, one for both methods. A run directory with a committed checkpoint must get
  the plan its checkpoints follow; a changed plan is refused with a `ConfigError` naming the fields that changed.
  The run's config.yaml is written only after that check (a refused rerun leaves the run directory as it was).
- `fit`: the `TorchTrainer` (checkpoints under `{run_dir}/checkpoints`, uploaded when that is in object
  storage), returning the last checkpoint's URI with its scheme. The method travels with the loop, so a method
  registered in the driver's process only (uft_ray.methods.register) is known in the workers too.
- `finish` and `result`: the final adapter with its tokenizer, the benchmarks, the report, the `RunResult`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow.compute as pc
import yaml

from uft_ray import methods, storage
from uft_ray.cluster_probe import check_cluster, resolve_worker_cpus
from uft_ray.config import Config, ConfigError
from uft_ray.console import say
from uft_ray.evaluation.heldout import check_benchmarks, run_benchmarks
from uft_ray.lease import Lease, lease_timeout
from uft_ray.lease import acquire as acquire_lease
from uft_ray.model_gguf import describe as describe_gguf
from uft_ray.model_store import local_model
from uft_ray.preflight import check_backends
from uft_ray.ray_utils import init_ray, route_worker_output, train_logging
from uft_ray.report import write_report as write_run_report
from uft_ray.rerun import check_rerun
from uft_ray.resources import local_cluster_cpus
from uft_ray.run_dir import CHECKPOINT_ADAPTER, CHECKPOINTS, RAY_LOG, RunDir, read_state
from uft_ray.train.plan import fingerprint, read_plan_summary

logger = logging.getLogger(__name__)

# What a plan depends on, by section, besides the method's own sections (`Method.sections`, after "train"): a
# change anywhere else never changes the plan.
PLAN_SECTIONS = ("data", "mixture", "tokenize", "train", "eval", "method")
# Keys of the loop's config that carry the method and its loop to the workers (`fit`).
_METHOD, _LOOP = "_uft_ray_method", "_uft_ray_loop"


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


@dataclass
class Run:
    """A run being driven: its resolved config, its directory, the tokenizer, and the config it last ran with."""

    cfg: Config
    dir: RunDir
    tokenizer: Any
    previous: dict[str, Any] | None = field(default=None, repr=False)  # the run directory's config.yaml, if any
    ray_log: str | None = None  # the local file Ray's worker output goes to (uft_ray.ray_utils.route_worker_output)
    resuming: bool = False  # the directory holds trained work (uft_ray.rerun): nothing is rewritten before keep_plan
    lease: Lease | None = field(default=None, repr=False)  # this driver's hold on the run directory (uft_ray.lease)

    def close(self) -> None:
        """The run is over (finished or failed): its directory's lease goes."""
        if self.lease is not None:
            self.lease.release()

    @property
    def pad_id(self) -> int:
        t = self.tokenizer
        return t.pad_token_id if t.pad_token_id is not None else t.eos_token_id


def plan_sections(method: str | None) -> tuple[str, ...]:
    """The config sections a plan of `method` depends on: the shared ones with the method's own after "train"."""
    known = methods.find(method) if isinstance(method, str) else None
    own = tuple(known.sections) if known is not None else ()
    i = PLAN_SECTIONS.index("train") + 1
    return PLAN_SECTIONS[:i] + own + PLAN_SECTIONS[i:]


def open_run(cfg: Config) -> Run:
    """The header every method runs before any work (see the module docstring)."""
    import ray  # Ray and transformers: imported when a run opens, not when the package is
    from transformers import AutoTokenizer

    # The method's own `auto` values, decided once, here (before the rerun check compares the config with the
    # run's saved one, which holds them decided).
    cfg = methods.of(cfg).resolve(cfg)
    model_dir = local_model(cfg.model.path, weights=False)  # a GGUF source is converted here, once per node
    if (note := describe_gguf(model_dir)) is not None:
        say(note)
    run_dir = RunDir(cfg.output.run_dir)
    storage.makedirs(run_dir.path)
    previous = yaml.safe_load(storage.read_bytes(run_dir.config)) if storage.is_file(run_dir.config) else None
    resuming = check_rerun(run_dir, cfg, previous)  # a changed config is refused here, before any work
    lease = acquire_lease(run_dir.path)  # a second live driver on this run directory is refused here
    if lease.taken_over is not None:
        say(f"took over the run directory's stale lease (its owner: host {lease.taken_over.get('host')}, "
            f"pid {lease.taken_over.get('pid')}; no heartbeat for over {lease_timeout():.0f} s)")  # fmt: skip
    try:
        logger.info("uft-ray %s run %s, resolved config:\n%s", cfg.method, run_dir.path, cfg.to_yaml())
        check_benchmarks(cfg)  # an unknown eval.tasks name fails now, not after training
        init_ray(cfg.ray, num_cpus=local_cluster_cpus(cfg))
        ray_log = _local_ray_log(run_dir)
        if route_worker_output(ray_log):
            say(f"Ray's own output: {ray_log}")
        else:
            ray_log = None
        cfg = resolve_worker_cpus(cfg)
        check_cluster(cfg)  # a cluster that can never hold the run fails now, not in a silent hang
        check_backends(cfg)  # vllm / lm_eval where the actors that import them will run, not minutes into the run
        tokenizer = AutoTokenizer.from_pretrained(model_dir, revision=cfg.model.revision)
        lease.beat(ray_job_id=ray.get_runtime_context().get_job_id())
        lease.start_heartbeat()
        return Run(cfg, run_dir, tokenizer, previous, ray_log, resuming, lease)
    except BaseException:
        lease.release()
        raise


def _local_ray_log(run_dir: RunDir) -> str:
    """The run's ray.log, or a local file to upload there when the run directory is in object storage."""
    if not storage.is_remote(run_dir.path):
        return storage.filesystem_for(run_dir.ray_log)[1]
    name = hashlib.sha256(run_dir.path.encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), "uft-ray-logs", name, RAY_LOG)


def last_checkpoint(run_dir: RunDir) -> str | None:
    """The last checkpoint Ray Train committed for this run (what a rerun resumes from), or None when there is
    none: no snapshot of Ray Train's checkpoint manager (a run that never committed one starts over, as Ray Train
    itself would). Any other failure to read it raises, naming the run directory."""
    snapshot = run_dir.checkpoint_snapshot
    try:
        committed = storage.is_file(snapshot)
    except Exception as e:  # auth, network: not the same as "no checkpoint"
        raise RuntimeError(f"{run_dir.path}: cannot tell whether it holds checkpoints ({snapshot}): {e}") from e
    if not committed:
        return None
    from ray.train import Result

    try:
        result = Result.from_path(run_dir.checkpoints)
    except Exception as e:
        raise RuntimeError(
            f"{run_dir.path}: its checkpoints cannot be read ({type(e).__name__}: {e}); fix or remove "
            f"{run_dir.checkpoints} to start over, or use a new output.run_name"
        ) from e
    return storage.as_uri(run_dir.path, result.checkpoint.path) if result.checkpoint is not None else None


def start_step(checkpoint: str | None) -> int:
    return int(read_state(checkpoint)["step"]) if checkpoint else 0


def keep_plan(run: Run, plan: Any, checkpoint: str | None) -> None:
    """Save the plan and the config, unless the run directory has a committed checkpoint of another plan: then
    refuse, naming what changed since (e.g. `train.micro_batch_size 4 -> 8`). A longer plan (train.max_steps or
    train.epochs grown) is the same plan when its first steps are the saved plan's: the run goes on past its end."""
    if checkpoint is not None and storage.is_file(run.dir.plan):
        saved = read_plan_summary(run.dir.plan)
        if not _same_prefix(plan, saved):
            changed = config_changes(run.previous, run.cfg.to_dict()) if run.previous is not None else []
            what = "; ".join(changed[:8]) if changed else "the data or batch config"
            raise ConfigError(
                [
                    f"{run.dir.path}: its checkpoints follow another plan (changed: {what}); use a new "
                    "output.run_name, or remove checkpoints/ to start over"
                ]
            )
    plan.save(run.dir.plan)
    storage.atomic_write(run.dir.config, run.cfg.to_yaml().encode())


def settle_packing(run: Run, padding_share: float | None) -> Config:
    """Decide `train.packing: auto` for this run (`uft_ray.packing.choose`: from the device and `padding_share`,
    the plan's share of padded tokens that are padding, None where not known) and say the choice; the run's config
    holds it from here on (the workers, the reference pass, config.yaml). Returns that config."""
    from uft_ray.packing import choose  # imports torch: only when a run trains

    packs, why = choose(run.cfg.train, padding_share)
    say(f"{'packed' if packs else 'padded'} micro-batches ({why})")
    run.cfg = replace(run.cfg, train=replace(run.cfg.train, packing=packs))
    return run.cfg


def _same_prefix(plan: Any, saved: Any) -> bool:
    """Whether `plan` starts with the saved plan's steps, row for row (the whole of it, when as long)."""
    if plan.summary.fingerprint == saved.fingerprint:
        return True
    if plan.summary.steps <= saved.steps:
        return False
    head = plan.table.filter(pc.less(plan.table["step"], saved.steps))
    return fingerprint(head) == saved.fingerprint


def config_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """`key old -> new` for every plan-relevant field that differs (dotted keys, in order)."""
    out: list[str] = []

    def walk(a: Any, b: Any, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in [*a, *(k for k in b if k not in a)]:
                walk(a.get(k), b.get(k), f"{key}.{k}" if key else str(k))
        elif a != b:
            out.append(f"{key} {a} -> {b}")

    for section in plan_sections(after.get("method")):
        walk(before.get(section), after.get(section), section)
    return out


def fit(cfg: Config, run_dir: RunDir, loop: Any, loop_config: dict[str, Any], datasets: dict[str, Any]) -> str | None:
    """Run `TorchTrainer(loop)` over the per-rank datasets; returns the last checkpoint's URI (with its scheme:
    `s3://...` for a run in object storage), or None."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tr = cfg.train
    trainer = TorchTrainer(
        in_worker,
        train_loop_config={**loop_config, _METHOD: methods.of(cfg), _LOOP: loop},
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
        # Each rank reads its own dataset whole (`train_{rank}`), in plan order.
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
    )
    result = trainer.fit()
    return storage.as_uri(run_dir.path, result.checkpoint.path) if result.checkpoint is not None else None


def in_worker(config: dict[str, Any]) -> None:
    """What every worker runs (`fit`): register the run's method in the worker's process (a method registered in
    the driver's process only, from a module the workers never import, is then known to the worker's config
    checks too), then the method's loop with its own config."""
    config = dict(config)
    methods.register(config.pop(_METHOD), replace=True)
    config.pop(_LOOP)(config)


def write_adapter(checkpoint: str, run_dir: RunDir, tokenizer: Any) -> None:
    """`{run_dir}/adapter`: the checkpoint's LoRA adapter with the tokenizer (peft's loadable layout)."""
    with storage.local_dir(run_dir.adapter) as out:
        storage.copy_tree(storage.join(checkpoint, CHECKPOINT_ADAPTER), out)
        tokenizer.save_pretrained(out)


def finish(run: Run, checkpoint: str | None, tracked: Any = None) -> None:
    """The final adapter with its tokenizer and the benchmarks (eval.tasks with lm_eval, into {run_dir}/eval),
    before the trackers close (`tracked`: they get the adapter)."""
    if not checkpoint:
        return
    write_adapter(checkpoint, run.dir, run.tokenizer)
    run_benchmarks(run.cfg, run.dir.path)
    if tracked is not None:
        tracked.adapter = run.dir.adapter


def result(run: Run, checkpoint: str | None, steps: int) -> RunResult:
    """The report (rebuilt from the run directory), then what the run returns."""
    try:
        run.dir.seal_metrics()  # an object store's metrics parts become one metrics.jsonl
    except OSError as e:  # the parts stay readable as they are
        logger.warning("could not seal metrics.jsonl: %s", e)
    if run.ray_log and storage.is_remote(run.dir.path) and os.path.isfile(run.ray_log):
        with open(run.ray_log, "rb") as f:
            storage.atomic_write(run.dir.ray_log, f.read())
    return RunResult(
        run_dir=run.dir.path,
        adapter_dir=run.dir.adapter,
        metrics_path=run.dir.metrics,
        metrics=run.dir.last_metrics(),
        checkpoint_dir=checkpoint,
        steps=steps,
        plan_path=run.dir.plan,
        report_path=write_report(run.dir),
    )


def write_report(run_dir: RunDir) -> str | None:
    try:
        return write_run_report(run_dir.path)
    except Exception as e:  # the run itself succeeded; `uft-ray report RUN_DIR` can rebuild it
        logger.warning("could not write the report: %s", e)
        return None
