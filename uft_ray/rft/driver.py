"""The driver of `method: hint_rft`: prompts -> plan -> rollout actors -> Ray Train -> the run directory.

`run(cfg)` is what `uft_ray.driver.run` hands a hint_rft config to. It writes the task rows (generated or read,
bad ones quarantined) under `{run_dir}/prompts`, makes the step plan (a rerun must find the same one), starts
the rollout actor pool (one actor per `rft.rollout.actors`, each with the base model and the LoRA adapter the
trainer sends after every step), builds each rank's prompt feed with Ray Data, and trains with `TorchTrainer`
and `rft_loop_per_worker`. The run directory has the offline method's layout (uft_ray.run_dir): config,
plan, checkpoints, metrics, the final adapter with its tokenizer, quarantine and report.
"""

from __future__ import annotations

import logging
from typing import Any

from uft_ray import storage
from uft_ray.config import Config
from uft_ray.model_store import local_model
from uft_ray.ray_utils import init_ray, train_logging
from uft_ray.resources import check_cluster
from uft_ray.run_dir import CHECKPOINTS, RunDir, read_state
from uft_ray.train.feeds import Background
from uft_ray.train.hooks import TrainHooks
from uft_ray.train.plan import Plan, read_plan_summary

logger = logging.getLogger(__name__)


def run(cfg: Config, *, hooks: TrainHooks | None = None) -> Any:
    """Train one hint_rft run end to end; rerun the same config and run name to resume."""
    from transformers import AutoTokenizer

    from uft_ray.driver import (
        RunResult,
        _last_checkpoint,
        _local_cpus,
        _with_worker_cpus,
        _write_report,
        write_adapter,
    )
    from uft_ray.rft.prompts import make_rft_plan, rank_feeds, read_prompts, write_prompts
    from uft_ray.trackers import open_trackers

    run_dir = RunDir(cfg.output.run_dir)
    storage.makedirs(run_dir.path)
    storage.atomic_write(run_dir.config, cfg.to_yaml().encode())
    logger.info("uft-ray hint_rft run %s, resolved config:\n%s", run_dir.path, cfg.to_yaml())
    from uft_ray.evaluation.heldout import check_benchmarks, run_benchmarks

    check_benchmarks(cfg)  # an unknown eval.tasks name fails now, not after training
    init_ray(cfg.ray, num_cpus=_local_cpus(cfg))
    cfg = _with_worker_cpus(cfg)
    check_cluster(cfg)  # a cluster that can never hold the run fails now, not in a silent hang
    tokenizer = AutoTokenizer.from_pretrained(local_model(cfg.model.path, weights=False), revision=cfg.model.revision)

    # 1. Prompts (deterministic: a rerun writes the same rows) and the plan.
    counts = write_prompts(cfg, run_dir, tokenizer)
    print(
        f"[uft-ray] prompts: {counts['train']} train, {counts['eval']} held out, "
        f"quarantined {sum(counts['quarantine'].values())} {counts['quarantine'] or ''}".rstrip(),
        flush=True,
    )
    plan = _plan(cfg, run_dir, make_rft_plan(read_prompts(run_dir, "train"), cfg))
    last = _last_checkpoint(run_dir)
    start = int(read_state(last)["step"]) if last else 0
    logger.info("plan: %d steps of %d prompts x %d rollouts; starting at step %d",
                plan.summary.steps, cfg.rft.prompts_per_step, cfg.rft.n, start)  # fmt: skip

    # 2. Each rank's prompts, built while the rollout actors load the base model.
    checkpoint = last
    if start < plan.summary.steps:
        building = Background(rank_feeds, run_dir, plan, cfg, start)
        actors = start_rollout_actors(cfg, tokenizer)
        feeds = building.result()
        try:
            with open_trackers(cfg, run_dir, start) as tracked:  # fed from metrics.jsonl while training
                checkpoint = _fit(cfg, run_dir, plan, feeds, actors, tokenizer, hooks or TrainHooks())
                if checkpoint:  # the final adapter and the benchmarks, before the trackers close
                    write_adapter(checkpoint, run_dir, tokenizer)
                    run_benchmarks(cfg, run_dir.path)  # eval.tasks with lm_eval, into {run_dir}/eval
                    tracked.adapter = run_dir.adapter
        finally:
            import ray

            for a in actors:
                ray.kill(a)
    elif checkpoint:  # trained to its end already: the outputs again
        write_adapter(checkpoint, run_dir, tokenizer)
        run_benchmarks(cfg, run_dir.path)

    # 3. Outputs: the report.
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


def _plan(cfg: Config, run_dir: RunDir, plan: Plan) -> Plan:
    """Save the plan; a rerun must make the same one (else its checkpoints belong to another plan)."""
    if storage.is_file(run_dir.plan) and storage.is_dir(run_dir.checkpoints):
        saved = read_plan_summary(run_dir.plan)
        if saved.fingerprint != plan.summary.fingerprint:
            raise RuntimeError(
                f"{run_dir.plan}: this run's checkpoints follow another plan (rft, data.seed or the batch shape "
                "changed); use a new output.run_name"
            )
    plan.save(run_dir.plan)
    return plan


def rollout_backend(cfg: Config) -> str:
    """`rft.rollout.backend: auto`: vLLM on GPU where it is installed, transformers `generate` otherwise."""
    backend = cfg.rft.rollout.backend
    if backend != "auto":
        return backend
    if not cfg.train.use_gpu:
        return "hf"
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def start_rollout_actors(cfg: Config, tokenizer: Any) -> list[Any]:
    """The rollout actor pool (uft_ray.rft.rollout), each with the base model and a LoRA slot."""
    import ray

    from uft_ray.config import compute_dtype
    from uft_ray.rft.rollout import RolloutActor

    ro, r = cfg.rft.rollout, cfg.rft
    backend = rollout_backend(cfg)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    remote = ray.remote(RolloutActor).options(
        num_cpus=ro.cpus_per_actor,
        num_gpus=ro.gpus_per_actor if cfg.train.use_gpu else 0,
        max_restarts=-1,  # a lost actor comes back; the trainer resends the adapter on its restart
    )
    actors = [
        remote.remote(
            cfg.model.path,
            lora={"r": cfg.lora.r, "alpha": cfg.lora.alpha, "target_modules": list(cfg.lora.target_modules)},
            backend=backend,
            dtype=compute_dtype(cfg),
            max_new_tokens=r.max_response_len,
            temperature=r.temperature,
            top_p=r.top_p,
            eos_token_ids=sorted(eos),
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            vocab_limit=len(tokenizer),
            batch_size=ro.batch_size,
            threads=max(1, int(ro.cpus_per_actor)),
            revision=cfg.model.revision,
            trust_remote_code=cfg.model.trust_remote_code,
            gpu_memory_utilization=ro.gpu_memory_utilization,
            max_model_len=r.max_prompt_len + r.max_response_len,
        )
        for _ in range(ro.actors)
    ]
    ray.get([a.digest.remote() for a in actors])  # loaded (a bad model path fails here, before training)
    logger.info("rollout actors: %d x %s", len(actors), backend)
    return actors


def _fit(
    cfg: Config,
    run_dir: RunDir,
    plan: Plan,
    feeds: dict[str, Any],
    actors: list[Any],
    tokenizer: Any,
    hooks: TrainHooks,
) -> str | None:
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from uft_ray.rft.loop import rft_loop_per_worker
    from uft_ray.rft.prompts import read_prompts

    tr = cfg.train
    eval_table = read_prompts(run_dir, "eval").select(["row_id", "prompt_ids", "row_json"])
    trainer = TorchTrainer(
        rft_loop_per_worker,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "run_dir": run_dir.path,
            "steps": plan.summary.steps,
            "actors": actors,
            "eval_rows": eval_table.slice(0, cfg.eval.max_rows or eval_table.num_rows).to_pylist(),
            "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            "hooks": hooks,
        },
        scaling_config=ScalingConfig(
            num_workers=tr.num_workers,
            use_gpu=tr.use_gpu,
            resources_per_worker={"CPU": tr.cpus_per_worker} | ({"GPU": tr.gpus_per_worker} if tr.use_gpu else {}),
        ),
        run_config=RunConfig(
            name=CHECKPOINTS,
            storage_path=run_dir.path,
            failure_config=FailureConfig(max_failures=tr.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            logging_config=train_logging(),
        ),
        datasets=feeds,
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
    )
    result = trainer.fit()
    return result.checkpoint.path if result.checkpoint is not None else None
