"""The per-worker loop of `method: hint_rft`, run by Ray Train's `TorchTrainer` on every rank.

Reads top to bottom: restore the last checkpoint (or start at step 0), build the same DeepSpeed + LoRA engine
as the offline method, send its adapter to the rollout actors; then for every step:
1. take this rank's prompts of the step from its feed (whole GRPO groups, hints already drawn by the plan);
2. ask the rollout actors for `rft.n` seeded continuations of each prompt + hint (uft_ray.rft.coordination);
3. score hint + response with the task's verifier (a child process, a time limit per rollout);
4. `rft.updates_per_step` optimizer steps of GRPO + hint NLL on the scored rollouts (uft_ray.rft.update);
5. send the new adapter to the actors (only the LoRA tensors; their digests must equal the trainer's);
6. before the first update (a row with `step` 0, the authors' `val_before_train`), every `eval.every` steps and
   at the end, greedy rollouts without hints on the held-out prompts;
7. the step's metrics over all ranks (uft_ray.rft.metrics); rank 0 appends them to `metrics.jsonl`;
   checkpoint through Ray Train.

`rft.objective: sft` replaces 2-4 with plain SFT on each prompt's whole reference answer
(uft_ray.rft.prompts.sft_targets, uft_ray.rft.update.sft_update): nothing is sampled or scored.

Determinism: hints are a pure function of (seed, step, row_id), and each rollout's sampling seed of (seed,
step, row_id, k); after a restart the restored adapter is sent to the actors before the first rollout, so a
resumed run regenerates (on CPU) exactly the rollouts of an uninterrupted one.

`config` (built by `uft_ray.rft.driver`): `cfg`, `run_dir`, `steps`, `actors` (rollout actor handles),
`eval_rows`, `pad_id`, `hooks`.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import ray.train
import ray.train.torch

from uft_ray.console import say
from uft_ray.model_store import local_model
from uft_ray.rft.coordination import evaluate_collective, rollouts_collective, sync_adapter_collective
from uft_ray.rft.metrics import metrics_row_collective
from uft_ray.rft.prompts import prompts_with_hints, sft_targets
from uft_ray.rft.rollout import RolloutPool
from uft_ray.rft.update import check_adapter_dropout, grpo_update, reference_adapter, sft_update
from uft_ray.tasks.generic import load_verifier
from uft_ray.tasks.verifier import VerifierProcess
from uft_ray.train import worker
from uft_ray.train.batches import check_plan_position, planned_batches
from uft_ray.train.collectives import evaluation_due
from uft_ray.train.nonfinite import StepWatch


def rft_loop_per_worker(config: dict[str, Any]) -> None:
    from transformers import AutoTokenizer

    w = worker.join(config)
    cfg, run, hooks, rank, world = w.cfg, w.run, w.hooks, w.rank, w.world
    r, total_steps, pad_id = cfg.rft, int(config["steps"]), config["pad_id"]
    sft = r.objective == "sft"
    pool = RolloutPool(config["actors"], rank, world, timeout_s=r.rollout.call_timeout_s)
    tokenizer = AutoTokenizer.from_pretrained(local_model(cfg.model.path, weights=False), revision=cfg.model.revision)
    eval_rows = config["eval_rows"][rank::world]  # this rank's share of the held-out prompts
    per_rank = r.prompts_per_step // world

    # 1. Where to start, this rank's prompts from there on, and the policy (restored on resume).
    shard = ray.train.get_dataset_shard(f"train_{rank}")
    state, start, prompts_iter, engine = worker.restore(
        w,
        initial_state={"step": 0, "seeds": {"data": cfg.data.seed, "train": cfg.train.seed}},
        optimizer_steps=total_steps * r.updates_per_step,  # the scheduler moves once per optimizer step
        feed=lambda start: planned_batches(shard, start, per_rank),
        reference_adapter=reference_adapter(cfg),
    )
    check_adapter_dropout(engine, cfg)
    # The actors generate with exactly this adapter from here on (after a restart: the restored one).
    sync_adapter_collective(w, engine, pool, version=start)
    verifier = VerifierProcess(
        load_verifier(r.task, r.reward_rules), r.verifier_timeout_s, memory_mb=r.verifier_memory_mb
    )

    def evaluate(version: int) -> dict[str, float]:
        return evaluate_collective(
            w, pool, eval_rows, verifier, tokenizer, expected_version=version, budget_s=r.verifier_budget_s
        )

    try:
        if start == 0:  # the baseline before any update (veRL's val_before_train), as uft's held-out eval has it
            baseline = evaluate(0)
            if rank == 0:
                run.append_metrics({"step": 0, "time": time.time(), **baseline})
        hooks.on_start(engine, rank=rank, start_step=start)
        skips = worker.nonfinite_skips(w, engine, state)

        engine.train()
        for step in range(start, total_steps):
            worker.seed_step(w, step)
            t_step = time.perf_counter()
            failed: Counter[str] = Counter()  # rollouts the verifier gave no verdict on, by reason

            # 2. This rank's prompts of the step, with their hints (sft: with their reference answers).
            t0 = time.perf_counter()
            batch = next(prompts_iter)
            times = {"wait": time.perf_counter() - t0, "generate": 0.0}
            check_plan_position(batch, step, 0, rank)
            watch = StepWatch()
            if sft:
                prompts, rollouts = sft_targets(batch, tokenizer), None
                t0 = time.perf_counter()
                train = sft_update(engine, cfg, prompts, pad_id, world, watch)
            else:
                # 3. Rollouts from the actor pool, scored by the verifier.
                t0 = time.perf_counter()
                prompts = prompts_with_hints(batch, tokenizer, r.max_prompt_len)
                rollouts = rollouts_collective(
                    w, engine, pool, prompts, step, n=r.n, seed=cfg.train.seed, expected_version=step
                )
                times["generate"] = time.perf_counter() - t0
                failed = _score(rollouts, verifier, tokenizer, r.verifier_budget_s)
                hooks.on_rollouts(rank=rank, step=step, rollouts=rollouts)

                # 4. GRPO + hint NLL updates on this rank's rollouts (every rank takes part in every collective).
                t0 = time.perf_counter()
                train = grpo_update(engine, cfg, rollouts, pad_id, world, watch)
            # A loss or gradient that is not a number stops every rank here, before the adapter reaches the actors.
            said = watch.check(step, rank, world, engine.grad_norm, ray.train.torch.get_device())
            if said and rank == 0:
                say(f"skipped (train.on_nonfinite: skip): {said}")
            times["train"] = time.perf_counter() - t0

            # 5. Only the adapter goes to the actors.
            sync_s, sync_bytes = sync_adapter_collective(w, engine, pool, version=step + 1)

            # 6. Greedy, hint-free validation.
            heldout = evaluate(step + 1) if evaluation_due(cfg.eval.every, step + 1, total_steps) else None

            # 7. Metrics over all ranks, then the checkpoint.
            step_time = time.perf_counter() - t_step
            row = metrics_row_collective(
                step, prompts, rollouts, train, times, step_time, sync_s, sync_bytes, heldout, engine, failed,
                world=world,
            )  # fmt: skip
            if skips is not None:
                row = skips.after(row, watch.skipped, said)
                state["nonfinite_skipped"] = skips.total
            state["step"] = step + 1
            state["prompts_consumed"] = (step + 1) * r.prompts_per_step
            if rank == 0:
                run.append_metrics(row)  # `uft-ray train/demo` print one line per step from this file
            if worker.checkpoint_due(cfg, state["step"], total_steps):
                worker.save_checkpoint(engine, state, row, rank)
            hooks.on_step_end(rank=rank, step=step + 1)

        if rank == 0:
            run.flush_metrics()  # a row a failed write left pending
        hooks.on_end(engine, rank=rank, cfg=cfg, pad_id=pad_id, device=ray.train.torch.get_device())
    finally:
        verifier.close()


def _score(rollouts: list[dict[str, Any]], verifier: VerifierProcess, tokenizer: Any, budget_s: float) -> Counter:
    """reward = verifier(row, hint + response): what follows the prompt, as the policy sees it, within the step's
    `budget_s`. Returns the rollouts that scored 0 for want of a verdict, by reason (VerifierProcess.failures)."""
    before = Counter(verifier.failures)
    texts = [r["hint_text"] + tokenizer.decode(r["response_ids"], skip_special_tokens=True) for r in rollouts]
    for r, reward in zip(
        rollouts, verifier.score([r["row"] for r in rollouts], texts, budget_s=budget_s), strict=True
    ):
        r["reward"] = float(reward)
    return verifier.failures - before
