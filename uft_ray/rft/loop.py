"""The per-worker loop of `method: hint_rft`, run by Ray Train's `TorchTrainer` on every rank.

Reads top to bottom: restore the last checkpoint (or start at step 0), build the same DeepSpeed + LoRA engine
as the offline method, send its adapter to the rollout actors; then for every step:
1. take this rank's prompts of the step from its feed (whole GRPO groups, hints already drawn by the plan);
2. ask the rollout actors for `rft.n` seeded continuations of each prompt + hint;
3. score hint + response with the task's verifier (a child process, a time limit per rollout);
4. group-normalized advantages, then `rft.updates_per_step` optimizer steps, one per mini-batch of whole GRPO
   groups (`update_minibatches`), each grouped by length into micro-batches: first the no-grad passes of every
   micro-batch (the reference's, no second model: the initial policy, `reference_adapter`; the old log-probs),
   then per micro-batch the policy's per-token log-probs and entropies in one forward and its backward; all
   three (policy, old, reference) from logits at the scored positions only, divided by `rft.temperature` as the
   rollouts sampled them (`scaled_token_logprobs`); the loss of `uft_ray.losses.hint_rft_loss` as a global token
   mean;
5. send the new adapter to the actors (only the LoRA tensors; their digests must equal the trainer's);
6. before the first update (a row with `step` 0, the authors' `val_before_train`), every `eval.every` steps and
   at the end, greedy rollouts without hints on the held-out prompts;
7. the step's metrics over all ranks; rank 0 appends them to `metrics.jsonl`; checkpoint through Ray Train.

Determinism: hints are a pure function of (seed, step, row_id), and each rollout's sampling seed of (seed,
step, row_id, k); after a restart the restored adapter is sent to the actors before the first rollout, so a
resumed run regenerates (on CPU) exactly the rollouts of an uninterrupted one.

`config` (built by `uft_ray.rft.driver`): `cfg`, `run_dir`, `steps`, `actors` (rollout actor handles),
`eval_rows`, `pad_id`, `hooks`.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.exceptions import RayActorError

from uft_ray import packing as packing_lib
from uft_ray.config import Config
from uft_ray.logprobs import model_token_logprobs
from uft_ray.losses import group_advantages, hint_rft_loss
from uft_ray.model_store import local_model
from uft_ray.packing import Packed
from uft_ray.reference.adapter_off import reference_model
from uft_ray.rft.actor_calls import ActorCallTimeout
from uft_ray.rft.rollout import RolloutPool, adapter_bytes, adapter_digest, request_seed
from uft_ray.tasks.generic import load_verifier
from uft_ray.tasks.hints import with_hint
from uft_ray.tasks.verifier import CORRECT, FORMATTED, VerifierProcess
from uft_ray.train import worker
from uft_ray.train.engine import Engine
from uft_ray.train.nonfinite import Skips, StepWatch, optimizer_step


def rft_loop_per_worker(config: dict[str, Any]) -> None:
    from transformers import AutoTokenizer

    w = worker.join(config)
    cfg, run, hooks, rank, world = w.cfg, w.run, w.hooks, w.rank, w.world
    r, total_steps = cfg.rft, int(config["steps"])
    pool = RolloutPool(config["actors"], rank, world, timeout_s=cfg.rft.rollout.call_timeout_s)
    tokenizer = AutoTokenizer.from_pretrained(local_model(cfg.model.path, weights=False), revision=cfg.model.revision)
    eval_rows = config["eval_rows"][rank::world]  # this rank's share of the held-out prompts
    per_rank = r.prompts_per_step // world

    # 1. Where to start, this rank's prompts from there on, and the policy (restored on resume).
    shard = ray.train.get_dataset_shard(f"train_{rank}")
    state, start, prompts_iter, engine = worker.restore(
        w,
        initial_state={"step": 0, "seeds": {"data": cfg.data.seed, "train": cfg.train.seed}},
        optimizer_steps=total_steps * r.updates_per_step,  # the scheduler moves once per optimizer step
        feed=lambda start: _planned_steps(shard, start, per_rank),
        reference_adapter=reference_adapter(cfg),
    )
    _check_adapter_dropout(engine, cfg)
    # The actors generate with exactly this adapter from here on (after a restart: the restored one).
    sync_adapter_collective(w, engine, pool, version=start)
    verifier = VerifierProcess(
        load_verifier(r.task, r.reward_rules), r.verifier_timeout_s, memory_mb=r.verifier_memory_mb
    )
    try:
        if start == 0:  # the baseline before any update (veRL's val_before_train), as uft's held-out eval has it
            accuracy = evaluate_collective(
                w, pool, eval_rows, verifier, tokenizer, expected_version=0, budget_s=r.verifier_budget_s
            )
            if rank == 0:
                run.append_metrics({"step": 0, "time": time.time(), "eval/accuracy": accuracy})
        hooks.on_start(engine, rank=rank, start_step=start)
        skips = None
        if cfg.train.on_nonfinite == "skip":
            engine.skip_nonfinite()
            skips = Skips(cfg.train.max_nonfinite_in_a_row, total=int(state.get("nonfinite_skipped", 0)))

        engine.train()
        for step in range(start, total_steps):
            worker.seed_step(w, step)
            t_step = time.perf_counter()
            times: dict[str, float] = {}
            failed: Counter[str] = Counter()  # rollouts the verifier gave no verdict on, by reason

            # 2. This rank's prompts of the step, with their hints.
            t0 = time.perf_counter()
            batch = next(prompts_iter)
            times["wait"] = time.perf_counter() - t0
            _check_step(batch, step, rank)
            t0 = time.perf_counter()
            if r.objective == "sft":  # the reference answer is the target: no rollouts, no rewards
                prompts = sft_targets(batch, tokenizer)
                rollouts = [
                    {**p, "k": 0, "group": i, "response_ids": [], "reward": 0.0} for i, p in enumerate(prompts)
                ]
                times["generate"] = 0.0
            else:
                prompts = prompts_with_hints(batch, tokenizer, r.max_prompt_len)

                # 3. Rollouts from the actor pool, scored by the verifier.
                rollouts = rollouts_collective(w, engine, pool, prompts, step, expected_version=step)
                times["generate"] = time.perf_counter() - t0
                failed = _score(rollouts, verifier, tokenizer, r.verifier_budget_s)
                hooks.on_rollouts(rank=rank, step=step, rollouts=rollouts)

            # 4. GRPO + hint NLL updates on this rank's rollouts (every rank takes part in every collective); a loss
            # or gradient that is not a number stops every rank here, before the adapter reaches the actors.
            t0 = time.perf_counter()
            watch = StepWatch()
            train = _train_on(engine, cfg, rollouts, config["pad_id"], world, watch)
            said = watch.check(step, rank, world, engine.grad_norm, ray.train.torch.get_device())
            if said and rank == 0:
                worker.say(f"[uft-ray] skipped (train.on_nonfinite: skip): {said}")
            times["train"] = time.perf_counter() - t0

            # 5. Only the adapter goes to the actors.
            sync_s, sync_bytes = sync_adapter_collective(w, engine, pool, version=step + 1)

            # 6. Greedy, hint-free validation.
            every = cfg.eval.every
            accuracy = None
            if (every and (step + 1) % every == 0) or step + 1 == total_steps:
                accuracy = evaluate_collective(
                    w, pool, eval_rows, verifier, tokenizer, expected_version=step + 1, budget_s=r.verifier_budget_s
                )

            # 7. Metrics over all ranks, then the checkpoint.
            step_time = time.perf_counter() - t_step
            row = _metrics_row_collective(
                step, prompts, rollouts, train, times, step_time, sync_s, sync_bytes, accuracy, engine, failed
            )
            if r.objective == "sft":  # no rollouts: nothing sampled, rewarded or clipped to report
                row = {k: v for k, v in row.items() if k not in _ROLLOUT_ONLY}
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
        hooks.on_end(engine, rank=rank, cfg=cfg, pad_id=config["pad_id"], device=ray.train.torch.get_device())
    finally:
        verifier.close()


# ---------------------------------------------------------------------------------------------------------
# Prompts and rollouts.


def _planned_steps(shard: Any, start: int, per_rank: int) -> Any:
    """This rank's prompts one step at a time; steps before `start` (a restarted attempt) skipped."""
    for batch in shard.iter_batches(batch_size=per_rank, batch_format="numpy", prefetch_batches=1):
        if int(batch["step"][0]) >= start:
            yield batch


def _check_step(batch: dict[str, np.ndarray], step: int, rank: int) -> None:
    steps, slots = batch["step"], batch["slot"]
    if not ((steps == step).all() and (slots == np.arange(len(slots))).all()):
        raise RuntimeError(
            f"rank {rank}: expected the prompts of plan step {step}, got steps {steps.tolist()} slots "
            f"{slots.tolist()}: the prompts did not arrive in plan order"
        )


def prompts_with_hints(batch: dict[str, np.ndarray], tokenizer: Any, max_prompt_len: int) -> list[dict[str, Any]]:
    """Each prompt with its revealed hint as token ids; a hint that would pass `max_prompt_len` reveals fewer
    chunks (the prompt alone always fits: longer ones were quarantined)."""
    out = []
    for i in range(len(batch["row_id"])):
        prompt_ids = [int(t) for t in batch["prompt_ids"][i]]
        chunks = [str(c) for c in batch["hint"][i]]
        revealed = int(batch["revealed"][i])
        hint_ids: list[int] = []
        while revealed:
            hint_text = with_hint("", chunks, revealed)
            hint_ids = tokenizer(hint_text, add_special_tokens=False)["input_ids"]
            if len(prompt_ids) + len(hint_ids) <= max_prompt_len:
                break
            revealed -= 1
            hint_ids = []
        out.append(
            {
                "row_id": str(batch["row_id"][i]),
                "row": json.loads(str(batch["row_json"][i])),
                "prompt_ids": prompt_ids,
                "hint_ids": hint_ids,
                "hint_text": with_hint("", chunks, revealed),
                "revealed": revealed,
                "n_chunks": len(chunks),
            }
        )
    return out


def sft_targets(batch: dict[str, np.ndarray], tokenizer: Any) -> list[dict[str, Any]]:
    """`rft.objective: sft`: each prompt with its whole reference answer (steps and the closing answer tag, then
    EOS) in the hint's place, so the hint term is plain SFT on it."""
    out = []
    for i in range(len(batch["row_id"])):
        row = json.loads(str(batch["row_json"][i]))
        target = tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            target = target + [tokenizer.eos_token_id]
        n_chunks = len(batch["hint"][i])
        out.append(
            {
                "row_id": str(batch["row_id"][i]),
                "row": row,
                "prompt_ids": [int(t) for t in batch["prompt_ids"][i]],
                "hint_ids": target,
                "hint_text": row["answer"],
                "revealed": n_chunks,
                "n_chunks": n_chunks,
            }
        )
    return out


def rollouts_collective(
    w: worker.Worker,
    engine: Engine,
    pool: RolloutPool,
    prompts: list[dict[str, Any]],
    step: int,
    *,
    expected_version: int,
) -> list[dict[str, Any]]:
    """n rollouts per prompt, group by group, each sampled with its own seed (seed, step, row_id, k).

    Every rollout must come from the adapter of `expected_version` (an actor behind the trainer would make the
    ratios off-policy). An actor that Ray restarted (it lost its adapter: version -1) gets the current adapter
    again and the rollouts are asked again; the ranks agree on that first, since the resend is a collective.
    """
    n, seed = w.cfg.rft.n, w.cfg.train.seed
    requests = [
        {"prompt_ids": p["prompt_ids"] + p["hint_ids"], "seed": request_seed(seed, step + 1, p["row_id"], k)}
        for p in prompts
        for k in range(n)
    ]
    out, failure = _generate(pool, requests)
    if failure is None and _agree_stale(w, out["versions"], expected_version):
        sync_adapter_collective(w, engine, pool, version=expected_version)
        out, failure = _generate(pool, requests)
    stale = failure is None and out["versions"] != {expected_version} and out["versions"] != set()
    if stale:
        failure = f"rollouts used adapter versions {sorted(out['versions'])}, expected {expected_version}"
    worker.agree_failure(w, failure)
    rollouts = []
    for i, response in enumerate(out["responses"]):
        p = prompts[i // n]
        rollouts.append({**p, "k": i % n, "group": i // n, "response_ids": [int(t) for t in response]})
    return rollouts


def _generate(pool: RolloutPool, requests: list[dict[str, Any]]) -> tuple[dict[str, Any], str | None]:
    """The pool's answer, or the failure every rank must agree on (a rank that raised alone would leave the
    others waiting in the next collective): an actor past its time limit, or one that cannot come back."""
    try:
        return pool.generate(requests), None
    except (ActorCallTimeout, RayActorError) as e:
        return {"responses": [], "seconds": 0.0, "versions": set()}, str(e)


def _agree_stale(w: worker.Worker, versions: set[int], expected: int) -> bool:
    """Whether any rank got rollouts from an actor that lost its adapter (a collective)."""
    stale = bool(versions) and versions != {expected}
    flag = torch.tensor([int(stale)], dtype=torch.int64, device=w.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(int(flag))


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


def evaluate_collective(
    w: worker.Worker,
    pool: RolloutPool,
    rows: list[dict[str, Any]],
    verifier: VerifierProcess,
    tokenizer: Any,
    *,
    expected_version: int,
    budget_s: float | None = None,
) -> float:
    """Greedy rollouts without hints on this rank's held-out prompts: the share answered correctly, over all
    ranks (a collective)."""
    correct, failure = 0, None
    if rows:
        out, failure = _generate(
            pool, [{"prompt_ids": list(r["prompt_ids"]), "seed": 0, "greedy": True} for r in rows]
        )
        if failure is None and out["versions"] != {expected_version}:
            failure = f"evaluation used adapter versions {sorted(out['versions'])}, expected {expected_version}"
    worker.agree_failure(w, failure)  # every rank raises, or none
    if rows:
        texts = [tokenizer.decode(resp, skip_special_tokens=True) for resp in out["responses"]]
        rewards = verifier.score([json.loads(r["row_json"]) for r in rows], texts, budget_s=budget_s)
        correct = sum(1 for x in rewards if x == CORRECT)
    totals = torch.tensor([float(correct), float(len(rows))], dtype=torch.float64, device=ray.train.torch.get_device())
    dist.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


def sync_adapter_collective(w: worker.Worker, engine: Engine, pool: RolloutPool, *, version: int) -> tuple[float, int]:
    """Gather the LoRA tensors (a collective), rank 0 sends them to every actor and checks their digests; the
    ranks then agree on the outcome, so no rank generates with an older adapter and none waits alone while
    another raises. Returns (seconds, bytes)."""
    t0 = time.perf_counter()
    state = engine.adapter_state_dict()
    pool.remember(state, version)  # every rank: an actor that restarts gets it back from the rank that finds it
    failure = None
    if w.rank == 0:
        digest = adapter_digest(state)
        try:
            digests = pool.load_adapter(state, version)
        except Exception as e:  # an actor died while loading: every rank stops, not rank 0 alone
            digests, failure = [], f"sending adapter version {version} to the rollout actors failed: {e}"
        if failure is None and any(d != digest for d in digests):
            failure = f"rollout actors hold adapter digests {digests}, the trainer {digest}"
        if failure is None:
            w.hooks.on_adapter_sync(rank=w.rank, step=version, trainer_digest=digest, actor_digests=digests)
    worker.agree_failure(w, failure)
    return time.perf_counter() - t0, adapter_bytes(state)


# ---------------------------------------------------------------------------------------------------------
# The updates.


def _pad(
    rollouts: list[dict[str, Any]], pad_id: int, device: torch.device, packing: dict[str, Any] | None = None
) -> dict[str, Any]:
    """prompt + hint + response, right-padded; masks of the response tokens and of the hint tokens. `packing`
    (uft_ray.packing.args): their padding-free layout too, under "packed", the rollouts of one prompt
    sharing it (and its hint, when they share one)."""
    seqs = [r["prompt_ids"] + r["hint_ids"] + r["response_ids"] for r in rollouts]
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    response = torch.zeros_like(ids)
    hint = torch.zeros_like(ids)
    for i, (s, r) in enumerate(zip(seqs, rollouts, strict=True)):
        p, h = len(r["prompt_ids"]), len(r["hint_ids"])
        ids[i, : len(s)] = torch.as_tensor(s)
        attention[i, : len(s)] = 1
        hint[i, p : p + h] = 1
        response[i, p + h : len(s)] = 1
    out: dict[str, Any] = {
        k: v.to(device) for k, v in dict(ids=ids, attention=attention, response=response, hint=hint).items()
    }
    if packing is not None:
        groups = packing_lib.key_groups([r["group"] for r in rollouts])
        out["packed"] = packing_lib.pack(out["ids"], out["attention"], groups=groups, pad_id=pad_id, **packing)
    return out


def scaled_token_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    temperature: float,
    with_entropy: bool,
    packed: Packed | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`uft_ray.logprobs.model_token_logprobs`: logits at the scored positions only, divided by the sampling
    temperature (veRL's dp_actor does the same for the policy, the old and the reference log-probs): the ratios
    and the KL are then those of the distribution the rollouts were drawn from, not of the temperature-1 one."""
    return model_token_logprobs(
        model, input_ids, attention_mask, loss_mask, with_entropy=with_entropy, temperature=temperature, packed=packed
    )


def _forward(
    engine: Engine, t: dict[str, torch.Tensor], temperature: float, *, grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Policy per-token log-probs over hint and response tokens (and entropies, when training)."""
    scored = t["response"] | t["hint"]
    with torch.set_grad_enabled(grad):
        return scaled_token_logprobs(
            engine.module,
            t["ids"],
            t["attention"],
            scored,
            temperature=temperature,
            with_entropy=grad,
            packed=t.get("packed"),
        )


def reference_adapter(cfg: Config) -> str | None:
    """The adapter of hint_rft's KL reference: the reference is the initial policy, as the authors' (veRL's
    reference is the actor it starts from). `reference.adapter` when set, else `model.adapter` (SFT-then-RFT's
    stage 2: base + the SFT adapter), else none: a fresh LoRA starts as the base, and the reference is the base
    (the adapter off). A resumed run keeps it: the checkpoint's adapter is the policy's, never the reference's."""
    return cfg.reference.adapter or cfg.model.adapter


def _reference(engine: Engine, t: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """The reference's per-token log-probs, no grad: the policy's base with the frozen reference adapter, or with
    the adapter off (through the model inside peft's wrapper, which keeps ZeRO-3's trace:
    uft_ray.reference.adapter_off)."""
    with reference_model(engine.peft_model) as base:
        logp, _ = scaled_token_logprobs(
            base,
            t["ids"],
            t["attention"],
            t["response"],
            temperature=temperature,
            with_entropy=False,
            packed=t.get("packed"),
        )
    return logp


def update_minibatches(rollouts: list[dict[str, Any]], updates: int, group: int) -> list[list[dict[str, Any]]]:
    """A rank's rollouts of the step, in order (group by group), cut into `updates` equal mini-batches of whole
    groups of `group` rollouts, one per optimizer step (veRL splits its batch in order into ppo_mini_batch_size
    prompts' rollouts). Raises when the sizes would cut a group (config validation refuses such a config)."""
    size, left = divmod(len(rollouts), updates)
    if left or size % group:
        raise ValueError(
            f"{len(rollouts)} rollouts do not split into {updates} mini-batches of whole groups of {group} "
            "(rft.updates_per_step, train.grad_accum x train.micro_batch_size, rft.n)"
        )
    out = [rollouts[u * size : (u + 1) * size] for u in range(updates)]
    for chunk in out:
        counts: dict[Any, int] = {}
        for x in chunk:
            counts[x["group"]] = counts.get(x["group"], 0) + 1
        if any(c != group for c in counts.values()):
            raise ValueError(f"a mini-batch holds part of a GRPO group (group sizes {sorted(counts.values())})")
    return out


def _check_adapter_dropout(engine: Engine, cfg: Config) -> None:
    """Config validation checks lora.dropout; a continued adapter (model.adapter, a resumed run) brings its own."""
    dropout = float(getattr(engine.peft_model.peft_config["default"], "lora_dropout", 0.0) or 0.0)
    if cfg.rft.objective == "grpo" and cfg.rft.updates_per_step > 1 and dropout > 0:
        raise ValueError(
            f"the adapter's lora_dropout is {dropout} with rft.updates_per_step {cfg.rft.updates_per_step}: the "
            "old and the new log-probs would disagree; use an adapter with lora.dropout 0 or rft.updates_per_step 1"
        )


def _train_on(
    engine: Engine,
    cfg: Config,
    rollouts: list[dict[str, Any]],
    pad_id: int,
    world: int,
    watch: StepWatch | None = None,
) -> dict[str, float]:
    """`rft.updates_per_step` optimizer steps over this rank's rollouts; the loss terms' global means. `watch`
    records each micro-batch's loss terms that are not numbers (uft_ray.train.nonfinite)."""
    r, mb, ga = cfg.rft, cfg.train.micro_batch_size, cfg.train.grad_accum
    device = ray.train.torch.get_device()
    sft = r.objective == "sft"
    rewards = torch.tensor([x["reward"] for x in rollouts], dtype=torch.float64)
    advantages = group_advantages(rewards, 1 if sft else r.n)  # rollouts arrive group by group
    for x, a in zip(rollouts, advantages.tolist(), strict=True):
        x["advantage"] = a
    hint_loss = sft or (r.hint.mode != "r3" and r.hint_coef > 0)  # R3 reveals hints but does not train on them
    hint_coef = 1.0 if sft else r.hint_coef  # sft: the answer's NLL is the whole loss
    updates = []
    packing = packing_lib.args(cfg)
    for chunk in update_minibatches(rollouts, r.updates_per_step, 1 if sft else r.n):
        # The advantages are already fixed, so the order inside an update is free. Padded: grouped by length.
        # Packed: no padding to save, and a prompt's rollouts kept together share the prompt's forward.
        if packing is None:
            chunk = sorted(chunk, key=lambda x: len(x["prompt_ids"]) + len(x["hint_ids"]) + len(x["response_ids"]))
        updates.append(
            [
                _pad(chunk[i : i + mb], pad_id, device, packing) | {"rows": chunk[i : i + mb]}
                for i in range(0, len(chunk), mb)
            ]
        )
    # Every no-grad forward before the first grad forward (uft_ray.reference.adapter_off: ZeRO-3's prefetch
    # order, and no reference activations next to the policy's): the reference's, and the old log-probs,
    # recomputed just before the updates (with one update they equal the training forward's).
    old: list[list[torch.Tensor | None]] = [[None] * len(micros) for micros in updates]
    # The reference feeds only the KL term: with rft.kl_coef 0 it is not computed at all (as veRL builds no
    # reference policy without a KL loss), and no "kl" is logged.
    with_kl = r.kl_coef > 0
    refs = [[_reference(engine, t, r.temperature) if with_kl else None for t in micros] for micros in updates]
    if r.updates_per_step > 1:
        for u, micros in enumerate(updates):
            for j, t in enumerate(micros):
                old[u][j] = _forward(engine, t, r.temperature, grad=False)[0]

    sums = dict.fromkeys(("loss", "pg_loss", "kl", "entropy", "hint_nll", "clip_frac"), 0.0)
    tokens = 0
    lr = engine.lr  # the rate the first update uses (the scheduler moves on at each optimizer step)
    for u, micros in enumerate(updates):
        # The update's global token counts: each micro-batch's loss is its token sum over them (rank-invariant).
        counts = torch.tensor(
            [float(sum(int(t["response"].sum()) for t in micros)), float(sum(int(t["hint"].sum()) for t in micros))],
            dtype=torch.float64,
            device=device,
        )
        dist.all_reduce(counts)
        n_resp, n_hint = float(counts[0]), float(counts[1])
        use_hint = hint_loss and n_hint > 0
        for j, t in enumerate(micros):
            logp, entropy = _forward(engine, t, r.temperature, grad=True)
            ref = refs[u][j]
            adv = torch.tensor([x["advantage"] for x in t["rows"]], dtype=logp.dtype, device=logp.device)
            loss, m = hint_rft_loss(
                logp, old[u][j] if old[u][j] is not None else logp.detach(), ref, adv, t["response"], entropy,
                hint_logp=logp if use_hint else None, hint_mask=t["hint"] if use_hint else None,
                clip=r.clip, kl_coef=r.kl_coef, entropy_coef=r.entropy_coef, hint_coef=hint_coef,
                n_tokens=n_resp, n_hint_tokens=n_hint,
            )  # fmt: skip
            if watch is not None:
                watch.loss(u * len(micros) + j, loss, m, [x.get("row_id", x.get("task", "")) for x in t["rows"]])
            # DeepSpeed divides by grad_accum and averages over ranks: scaling by both leaves the global mean.
            engine.backward(loss * world * ga)
            if watch is not None:
                optimizer_step(engine, watch)
            else:
                engine.step()
            local = float(t["response"].sum())
            for k in sums:
                # clip_frac is the micro-batch's own fraction: weigh it by its share of the update's tokens
                sums[k] += float(m[k]) * (local / max(n_resp, 1.0) if k == "clip_frac" else 1.0)
            tokens += int(t["attention"].sum())
    return {**{k: v / r.updates_per_step for k, v in sums.items()}, "train_tokens": float(tokens), "lr": lr,
            "with_kl": with_kl}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Metrics.

_ROLLOUT_ONLY = ("pg_loss", "reward/mean", "reward/accuracy", "reward/format", "response/length", "kl", "entropy",
                 "clip_frac", "time/generate_frac", "rollout/tokens_per_s", "verifier/timeouts",
                 "verifier/failed")  # fmt: skip
_SUMMED = (
    "reward",
    "correct",
    "formatted",
    "rollouts",
    "hint_share",
    "hint_tokens",
    "prompts",
    "response_tokens",
    "train_tokens",
    "loss",
    "pg_loss",
    "kl",
    "entropy",
    "hint_nll",
    "clip_frac",
    "verifier_timeouts",
    "verifier_failed",
)


def _metrics_row_collective(
    step: int,
    prompts: list[dict[str, Any]],
    rollouts: list[dict[str, Any]],
    train: dict[str, float],
    times: dict[str, float],
    step_time: float,
    sync_s: float,
    sync_bytes: int,
    accuracy: float | None,
    engine: Engine,
    failed: Counter[str],
) -> dict[str, Any]:
    """One metrics.jsonl line (names of issue 11 / docs/internals.md); sums over ranks in one all-reduce."""
    rewards = [x["reward"] for x in rollouts]
    local = {
        "reward": sum(rewards),
        "correct": sum(1 for x in rewards if x == CORRECT),
        "formatted": sum(1 for x in rewards if x >= FORMATTED),
        "rollouts": len(rollouts),
        "hint_share": sum(p["revealed"] / p["n_chunks"] if p["n_chunks"] else 0.0 for p in prompts),
        "prompts": len(prompts),
        "hint_tokens": sum(len(x["hint_ids"]) for x in rollouts),
        "response_tokens": sum(len(x["response_ids"]) for x in rollouts),
        "train_tokens": train["train_tokens"],
        # rollouts scored 0 without the verifier's verdict: past the time limit or the step's budget, or any reason
        "verifier_timeouts": failed["timeout"] + failed["step_budget"],
        "verifier_failed": sum(failed.values()),
        # the loss terms are already global means (each rank holds its share of the sum)
        **{k: train[k] for k in ("loss", "pg_loss", "kl", "entropy", "hint_nll", "clip_frac")},
    }
    device = ray.train.torch.get_device()
    summed = torch.tensor([float(local[k]) for k in _SUMMED], dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    g = dict(zip(_SUMMED, summed.tolist(), strict=True))
    slowest = torch.tensor(
        [times["generate"], times["train"], times["wait"], step_time], dtype=torch.float64, device=device
    )
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    gen_s, train_s, wait_s, step_s = slowest.tolist()
    row: dict[str, Any] = {
        "step": step + 1,
        "time": time.time(),
        "loss": g["loss"],
        "pg_loss": g["pg_loss"],
        "reward/mean": g["reward"] / g["rollouts"],
        "reward/accuracy": g["correct"] / g["rollouts"],
        "reward/format": g["formatted"] / g["rollouts"],
        "hint/share": g["hint_share"] / g["prompts"],
        "response/length": g["response_tokens"] / g["rollouts"],
        "entropy": g["entropy"],
        "clip_frac": g["clip_frac"],
        "time/generate_frac": min(gen_s / step_s, 1.0),
        "rollout/tokens_per_s": g["response_tokens"] / gen_s if gen_s > 0 else 0.0,
        "tokens_per_s": g["train_tokens"] / train_s if train_s > 0 else 0.0,
        "sync/adapter_s": sync_s,
        "sync/adapter_bytes": sync_bytes,
        "data_wait_frac": min(wait_s / step_s, 1.0),
        "step_time_s": step_s,
        "lr": train["lr"],
        "grad_norm": engine.grad_norm,
        "verifier/timeouts": int(g["verifier_timeouts"]),
        "verifier/failed": int(g["verifier_failed"]),
    }
    if train["with_kl"]:
        row["kl"] = g["kl"]
    if g["hint_tokens"] > 0:  # no hint revealed anywhere: no hint term, and no number to log
        row["hint_nll"] = g["hint_nll"]
    if accuracy is not None:
        row["eval/accuracy"] = accuracy
    return row
