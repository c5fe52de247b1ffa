"""The driver of `method: hint_rft`: prompts -> plan -> rollout actors -> Ray Train -> the run directory.

`run(cfg)` is what `uft_ray.driver.run` hands a hint_rft config to (through the method registry,
uft_ray.rft.method). It writes the task rows (generated or read, bad ones quarantined) under `{run_dir}/prompts`,
makes the step plan (a rerun must find the same one), starts the rollout actor pool (one actor per
`rft.rollout.actors`, each with the base model and the LoRA adapter the trainer sends after every step), builds
each rank's prompt feed with Ray Data, and trains with `TorchTrainer` and `rft_loop_per_worker`. The run
directory has the offline method's layout (uft_ray.run_dir): config, plan, checkpoints, metrics, the final adapter
with its tokenizer, quarantine and report.
"""

from __future__ import annotations

import logging
from typing import Any

from uft_ray.config import Config, compute_dtype
from uft_ray.console import say
from uft_ray.rft.backend import rollout_backend
from uft_ray.rft.hooks import rft_hooks
from uft_ray.rft.prompts import build_prompts, check_prompts, make_rft_plan, rank_feeds, read_prompts, save_prompts
from uft_ray.rft.rollout import RolloutActor, rollout_memory_fraction
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
from uft_ray.train.feeds import Background
from uft_ray.train.hooks import TrainHooks

logger = logging.getLogger(__name__)


def run(cfg: Config, *, hooks: TrainHooks | None = None) -> RunResult:
    """Train one hint_rft run end to end; rerun the same config and run name to resume."""
    run_ = open_run(cfg)
    try:
        return _run(run_, hooks)
    finally:
        run_.close()


def _run(run_: Run, hooks: TrainHooks | None) -> RunResult:
    cfg, run_dir = run_.cfg, run_.dir

    # 1. Prompts (deterministic: a rerun builds the same rows) and the plan (a changed one is refused), decided
    # before anything is written: a refused rerun leaves the run directory as it was.
    prompts = build_prompts(cfg, run_.tokenizer)
    counts, quarantined = prompts.counts, prompts.counts["quarantine"]
    say(f"prompts: {counts['train']} train, {counts['eval']} held out, "
        f"quarantined {sum(quarantined.values())} {quarantined or ''}".rstrip())  # fmt: skip
    if counts["train"] < cfg.rft.prompts_per_step:
        if not run_.resuming:  # the quarantine says why; a trained run's own files are left as they are
            save_prompts(prompts, run_dir)
        check_prompts(cfg, prompts, run_dir)
    last = last_checkpoint(run_dir)
    plan = make_rft_plan(prompts.train, cfg)
    cfg = settle_packing(run_, None)  # rollouts' lengths are not known before they are generated
    keep_plan(run_, plan, last)
    save_prompts(prompts, run_dir)
    start = start_step(last)
    logger.info("plan: %d steps of %d prompts x %d rollouts; starting at step %d",
                plan.summary.steps, cfg.rft.prompts_per_step, cfg.rft.n, start)  # fmt: skip

    # 2. Each rank's prompts, built while the rollout actors load the base model (they go on loading while the
    # trainer starts); the actors are stopped whatever happens, from the first one started on.
    checkpoint = last
    if start < plan.summary.steps:
        building = Background(rank_feeds, run_dir, plan, cfg, start)
        actors: list[Any] = []
        try:
            start_rollout_actors(cfg, run_.tokenizer, into=actors)
            feeds = building.result()
            with open_trackers(cfg, run_dir, start) as tracked:  # fed from metrics.jsonl while training
                checkpoint = _fit(run_, plan, feeds, actors, rft_hooks(hooks))
                finish(run_, checkpoint, tracked)  # the final adapter and the benchmarks, before they close
        except BaseException:
            building.abandon()
            raise
        finally:
            stop_rollout_actors(actors)
    else:  # trained to its end already: the outputs again
        finish(run_, checkpoint)

    # 3. Outputs: the report.
    return result(run_, checkpoint, plan.summary.steps)


def rollout_threads(cfg: Config) -> int:
    """Torch threads of a CPU rollout actor: its own CPUs and its share of the training workers' (hint_rft is
    on-policy: the workers wait while the actors generate, so their cores would sit idle); the actor caps it at its
    node's cores. On GPU: its own CPUs."""
    ro, tr = cfg.rft.rollout, cfg.train
    own = max(1, int(ro.cpus_per_actor))
    if tr.use_gpu or isinstance(tr.cpus_per_worker, str):
        return own
    return max(own, int((ro.cpus_per_actor * ro.actors + tr.cpus_per_worker * tr.num_workers) / ro.actors))


def start_rollout_actors(cfg: Config, tokenizer: Any, *, into: list[Any]) -> list[Any]:
    """The rollout actor pool (uft_ray.rft.rollout), each with the base model and a LoRA slot, appended to `into`
    as each starts (so that a caller's `finally` stops every one started, even when a later one fails)."""
    import ray  # Ray: imported when actors start

    ro, r = cfg.rft.rollout, cfg.rft
    backend = rollout_backend(cfg)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    remote = ray.remote(RolloutActor).options(
        num_cpus=ro.cpus_per_actor,
        num_gpus=ro.gpus_per_actor if cfg.train.use_gpu else 0,
        max_restarts=-1,  # a lost actor comes back; the trainer resends the adapter on its restart
    )
    for _ in range(ro.actors):
        into.append(remote.remote(
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
            threads=rollout_threads(cfg),
            revision=cfg.model.revision,
            trust_remote_code=cfg.model.trust_remote_code,
            gpu_memory_utilization=rollout_memory_fraction(ro.gpu_memory_utilization, ro.gpus_per_actor),
            max_model_len=r.max_prompt_len + r.max_response_len,
        ))  # fmt: skip
    # Not waited for here: they load their model while the trainer starts (on a GPU, vLLM's start and DeepSpeed's
    # overlap). The loop's first call, the adapter sync before any rollout, waits for them, and an actor that
    # failed to load fails the run there on every rank, with the actor's error.
    logger.info("rollout actors: %d x %s, loading", len(into), backend)
    return into


def stop_rollout_actors(actors: list[Any], close_timeout_s: float = 30.0) -> None:
    """Close every actor (its adapter directories go), then kill it; an actor that is dead or does not answer in
    time is killed all the same (the next actor's start sweeps what it left)."""
    import ray  # Ray: imported when actors stop

    closing = [a.close.remote() for a in actors]
    if closing:
        ray.wait(closing, num_returns=len(closing), timeout=close_timeout_s)
    for a in actors:
        ray.kill(a, no_restart=True)


def _fit(run_: Run, plan: Any, feeds: dict[str, Any], actors: list[Any], hooks: TrainHooks) -> str | None:
    from uft_ray.rft.loop import rft_loop_per_worker  # imports torch and DeepSpeed: only when training

    cfg = run_.cfg
    eval_table = read_prompts(run_.dir, "eval").select(["row_id", "prompt_ids", "row_json"])
    loop_config = {
        "cfg": cfg.to_dict(),
        "run_dir": run_.dir.path,
        "steps": plan.summary.steps,
        "actors": actors,
        "eval_rows": eval_table.slice(0, cfg.eval.max_rows or eval_table.num_rows).to_pylist(),
        "pad_id": run_.pad_id,
        "hooks": hooks,
    }
    return fit(cfg, run_.dir, rft_loop_per_worker, loop_config, feeds)
