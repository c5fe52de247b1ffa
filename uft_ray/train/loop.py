"""The per-worker training loop that Ray Train's `TorchTrainer` runs on every rank.

Reads top to bottom: restore the last checkpoint (if any), build the DeepSpeed engine, then for every planned
step: take this rank's planned micro-batches, compute the policy's log-probs (and the reference's, from the
rows' `ref_logp` columns or a forward with the adapter off), the loss of `loss.type`, backward and step;
aggregate the step's metrics over all ranks; rank 0 appends them to `metrics.jsonl`; checkpoint every
`train.checkpoint_every` steps and at the end through `ray.train.report`.

Data: the driver gives each rank its own dataset `train_{rank}`, already tagged with the plan (`step`,
`micro`, `slot`) and sorted in plan order (see `uft_ray.driver`), so a rank reads exactly its micro-batches in
order. After a failure inside one `fit()` the dataset restarts from its beginning: micro-batches of steps
before the restored step are skipped, so nothing is trained twice.

`config` (built by the driver): `cfg` (the run config as a dict), `run_dir`, `steps`, `sources`,
`target_fraction`, `pad_id`, and `hooks` (a `uft_ray.train.hooks.TrainHooks`; the default does nothing).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch

from uft_ray import packing as packing_lib
from uft_ray.config import Config
from uft_ray.console import say
from uft_ray.evaluation import heldout
from uft_ray.logprobs import model_sequence_logprobs
from uft_ray.losses import (
    SATURATED,
    dpo_loss,
    kto_loss,
    per_source_metrics,
    sft_loss,
    sft_row_saturation,
    uft_loss,
    una_bce_loss,
)
from uft_ray.reference.adapter_off import adapter_off_logprobs
from uft_ray.schema import REF_LOGP, REF_LOGP_REJECTED
from uft_ray.train import worker
from uft_ray.train.batches import check_plan_position, pad_batch, planned_batches
from uft_ray.train.collectives import (
    backward_scale,
    evaluation_due,
    max_collective,
    records_collective,
    sum_collective,
)
from uft_ray.train.engine import Engine
from uft_ray.train.nonfinite import StepWatch, optimizer_step


def train_loop_per_worker(config: dict[str, Any]) -> None:
    w = worker.join(config)
    cfg, run, hooks, rank, world, device = w.cfg, w.run, w.hooks, w.rank, w.world, w.device
    total_steps, sources = int(config["steps"]), list(config["sources"])
    mb, ga = cfg.train.micro_batch_size, cfg.train.grad_accum
    packing = packing_lib.args(cfg)

    # 1-3. Where to start (the last checkpoint's driver state: step, rows consumed per source, seeds; or step
    # 0), this rank's planned micro-batches in plan order from there on, and the policy under DeepSpeed (on
    # resume its adapter, optimizer and scheduler come back as saved).
    shard = ray.train.get_dataset_shard(f"train_{rank}")
    state, start, batches, engine = worker.restore(
        w,
        initial_state=_initial_state(cfg, sources),
        optimizer_steps=total_steps,
        feed=lambda start: planned_batches(shard, start, mb, prefetch_batches=2),
    )
    heldout = ray.train.get_dataset_shard(f"eval_{rank}") if config.get("heldout") else None
    if heldout is not None and start == 0:  # the baseline: the policy is still the reference (r = 0)
        baseline = {
            "step": 0,
            "time": time.time(),
            **evaluate_collective(engine, cfg, heldout, config["pad_id"], world),
        }
        if rank == 0:
            run.append_metrics(baseline)
    hooks.on_start(engine, rank=rank, start_step=start)
    skips = worker.nonfinite_skips(w, engine, state)

    engine.train()
    warned = False  # the early-saturation warning: once per run
    for step in range(start, total_steps):
        worker.seed_step(w, step)
        t_step = time.perf_counter()
        acc = _StepRecord()
        step_batches = []
        for micro in range(ga):
            t0 = time.perf_counter()
            batch = next(batches)
            acc.wait_s += time.perf_counter() - t0
            check_plan_position(batch, step, micro, rank)
            tensors = collate(batch, config["pad_id"], device, pairs=cfg.loss.type == "dpo", packing=packing)
            step_batches.append((batch, tensors))
        kto_z, refs = kto_reference_point(engine, cfg, step_batches) if cfg.loss.type == "kto" else (None, None)
        step_tokens = step_token_count(cfg, step_batches)
        watch = StepWatch()
        for micro, (batch, tensors) in enumerate(step_batches):
            ref = refs[micro] if refs else None
            loss, metrics = micro_batch_loss(engine, cfg, batch, tensors, kto_z=kto_z, ref=ref)
            watch.loss(micro, loss, {k: v for k, v in metrics.items() if k.startswith("rows/")}, batch["source"])
            scaled = loss * loss_scale(cfg, batch, tensors, step_tokens, world, ga)
            acc.lr = engine.lr  # the rate this update uses (the scheduler moves on at the step)
            engine.backward(scaled)
            optimizer_step(engine, watch)
            acc.add(batch, tensors, metrics, float(scaled.detach()))
            hooks.on_micro_batch(rank=rank, step=step, micro=micro, batch=batch)
        step_time = time.perf_counter() - t_step
        # A loss or gradient that is not a number stops every rank here, before this step's metrics or checkpoint
        # (train.on_nonfinite: skip: unless the step was skipped on every rank before the optimizer took it).
        said = watch.check(step, rank, world, engine.grad_norm, device)
        if said and rank == 0:
            say(f"skipped (train.on_nonfinite: skip): {said}")

        # 4. The step's metrics over the whole global batch (every rank takes part: a collective).
        record = _aggregate_collective(acc, world)
        for source, n in record["rows_by_source"].items():
            state["consumed"][source] = state["consumed"].get(source, 0) + n
        state["step"] = step + 1
        row = _metrics_row(record, state, config, step, step_time, world * ga, engine.grad_norm)
        if cfg.loss.type == "uft":  # SFT rows that no longer teach; kappa from the first step's rows
            row.update(sft_row_saturation(record["rows"], record["kinds"], record["sources"], cfg.loss.beta,
                                          kappa=step == 0))  # fmt: skip
            if not warned and rank == 0 and (message := saturation_warning(row, step, total_steps, cfg.loss.beta)):
                say(message)
                warned = True
        if skips is not None:
            row = skips.after(row, watch.skipped, said)
            state["nonfinite_skipped"] = skips.total
        if heldout is not None and evaluation_due(cfg.eval.every, step + 1, total_steps):
            t_eval = time.perf_counter()
            row.update(evaluate_collective(engine, cfg, heldout, config["pad_id"], world))
            row["time/eval_s"] = time.perf_counter() - t_eval  # not part of step_time_s
        if rank == 0:
            run.append_metrics(row)

        # 5. Checkpoint: adapter + optimizer/scheduler + driver state, through Ray Train.
        if worker.checkpoint_due(cfg, state["step"], total_steps):
            worker.save_checkpoint(engine, state, row, rank)
        hooks.on_step_end(rank=rank, step=step + 1)

    if rank == 0:
        run.flush_metrics()  # a row a failed write left pending
    hooks.on_end(engine, rank=rank, cfg=cfg, pad_id=config["pad_id"], device=device)


# ---------------------------------------------------------------------------------------------------------
# Data: a micro-batch of this rank's feed (uft_ray.train.batches), padded or packed.


def collate(
    batch: dict[str, np.ndarray],
    pad_id: int,
    device: torch.device,
    *,
    pairs: bool,
    packing: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tensors of one micro-batch. Pairs: chosen rows then rejected rows, padded together for one forward.

    `packing` (`uft_ray.packing.args(cfg)`): also their padding-free layout under "packed" (uft_ray.packing), a pair's
    chosen and rejected sharing their prompt; the forwards run on it. "tokens": the rows' tokens; "computed" and
    "padded": the positions the forward computes that hold a token, and all of them."""
    seqs, starts = list(batch["input_ids"]), [int(x) for x in batch["response_start"]]
    if pairs:
        seqs += list(batch["rejected_input_ids"])
        starts += [int(x) for x in batch["rejected_response_start"]]
    # the loss mask covers the response tokens (and EOS)
    out: dict[str, Any] = pad_batch(
        seqs, pad_id, device, {"loss_mask": [(r, len(s)) for s, r in zip(seqs, starts, strict=True)]}
    )
    out["tokens"] = out["computed"] = int(sum(len(s) for s in seqs))
    out["padded"] = int(out["input_ids"].numel())
    if packing is not None:
        groups = packing_lib.pair_groups(len(batch["row_id"])) if pairs else None
        packed = packing_lib.pack(out["input_ids"], out["attention_mask"], groups=groups, pad_id=pad_id, **packing)
        out |= {"packed": packed, "computed": packed.tokens, "padded": packed.size}
    return out


# ---------------------------------------------------------------------------------------------------------
# The loss of one micro-batch.


def _reference_logprobs(
    engine: Engine, cfg: Config, batch: dict[str, np.ndarray], tensors: dict[str, Any], device: torch.device
) -> torch.Tensor:
    """Reference log-probs of a micro-batch (chosen then rejected for pairs): the joined cache columns, or the
    same forward with LoRA disabled (`reference.mode: adapter_off`, no grad). Call it before the micro-batch's
    policy forward (uft_ray.reference.adapter_off: ZeRO-3's prefetch order, peak memory)."""
    if cfg.reference.mode == "adapter_off":
        ref, _ = adapter_off_logprobs(
            engine.peft_model,
            tensors["input_ids"],
            tensors["attention_mask"],
            tensors["loss_mask"],
            packed=tensors.get("packed"),
        )
        return ref
    columns = [REF_LOGP, REF_LOGP_REJECTED] if cfg.loss.type == "dpo" else [REF_LOGP]
    return torch.as_tensor(np.concatenate([batch[c] for c in columns]).astype(np.float64), device=device)


def kto_reference_point(
    engine: Engine, cfg: Config, step_batches: list[tuple[dict, dict]]
) -> tuple[float | None, list[torch.Tensor] | None]:
    """KTO's z for the whole optimizer step: the mean log-ratio over every row of the global batch; and the
    reference log-probs of each micro-batch it computed on the way (None when it computed none).

    One estimate per step (as uft_ray.losses documents), whatever the split into ranks and micro-batches, so
    the loss does not change with `grad_accum`. With one micro-batch per step the training forward itself
    gives it (None here: `micro_batch_loss` all-reduces it); with more, a no-grad forward over the step's
    micro-batches first (a forward costs about a third of a training step).
    """
    if len(step_batches) == 1:
        return None, None
    total = torch.zeros(2, dtype=torch.float64)
    refs = []
    with torch.no_grad():
        for batch, t in step_batches:
            ref = _reference_logprobs(engine, cfg, batch, t, t["input_ids"].device)
            policy, _ = model_sequence_logprobs(
                engine.module, t["input_ids"], t["attention_mask"], t["loss_mask"], packed=t.get("packed")
            )
            ref = ref.to(policy.device)
            total += torch.tensor([float((policy.double() - ref.double()).sum()), float(len(batch["row_id"]))])
            refs.append(ref)
    logratio, rows = sum_collective(total.tolist())
    return logratio / rows, refs


def scored_tokens(tensors: dict[str, Any]) -> int:
    """The response tokens a micro-batch's loss scores: the loss mask from the second position on (the first token
    has no prediction; uft_ray.logprobs counts the same)."""
    return int((tensors["loss_mask"][:, 1:] != 0).sum())


def step_token_count(cfg: Config, step_batches: list[tuple[dict, dict]]) -> int | None:
    """The scored tokens of the whole optimizer step (every rank, every micro-batch: a collective) for the sft
    loss's token reduction, whose denominator they are; None for every other loss (rows are the unit)."""
    if cfg.loss.type != "sft" or cfg.loss.sft_reduction != "token":
        return None
    (count,) = sum_collective([sum(scored_tokens(t) for _, t in step_batches)])
    return int(count)


def loss_scale(
    cfg: Config, batch: dict[str, np.ndarray], tensors: dict[str, Any], step_tokens: int | None, world: int, ga: int
) -> float:
    """The factor on a micro-batch's loss that makes DeepSpeed's averaging give the global batch's mean
    (uft_ray.train.collectives.backward_scale): over rows, or over scored tokens for the sft token reduction
    (`step_tokens`)."""
    if step_tokens is not None:
        return backward_scale(world, ga, scored_tokens(tensors), step_tokens)
    return backward_scale(world, ga, len(batch["row_id"]), cfg.train.global_batch_size)


def micro_batch_loss(
    engine: Engine,
    cfg: Config,
    batch: dict[str, np.ndarray],
    tensors: dict[str, Any],
    *,
    kto_z: float | None = None,
    ref: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reference log-probs, policy log-probs and `loss.type`'s loss (uft_ray.losses) for one micro-batch.

    The reference first: its no-grad forward (`reference.mode: adapter_off`) must not run between the policy's
    forward and backward (uft_ray.reference.adapter_off). `ref`: the reference log-probs already computed
    (`kto_reference_point`'s). `kto_z`: KTO's reference point for this optimizer step (`kto_reference_point`);
    None: this micro-batch is the rank's whole step, and z is all-reduced from it here.
    """
    n = len(batch["row_id"])
    ids, attention, loss_mask = tensors["input_ids"], tensors["attention_mask"], tensors["loss_mask"]
    loss_type, beta = cfg.loss.type, cfg.loss.beta
    if ref is None and loss_type != "sft":
        ref = _reference_logprobs(engine, cfg, batch, tensors, ids.device)
    policy, n_tokens = model_sequence_logprobs(engine.module, ids, attention, loss_mask, packed=tensors.get("packed"))
    device = policy.device
    weights = cfg.loss.source_weights or {}
    weight = torch.tensor([weights.get(s, 1.0) for s in batch["source"]], dtype=policy.dtype, device=device)

    if loss_type == "sft":
        return sft_loss(policy, n_tokens, weight=weight, reduction=cfg.loss.sft_reduction)
    ref = ref.to(device)
    if loss_type == "dpo":
        return dpo_loss(
            policy[:n], policy[n:], ref[:n], ref[n:], beta, weight=weight,
            n_tokens_chosen=n_tokens[:n], n_tokens_rejected=n_tokens[n:],
        )  # fmt: skip
    score = torch.as_tensor(batch["score"].astype(np.float64), device=device)
    if loss_type == "kto":
        if kto_z is None:  # every rank's micro-batch is the step: all-reduce z from this forward
            logratio, rows = sum_collective([float((policy.detach() - ref).sum()), float(n)])
            kto_z = logratio / rows
        return kto_loss(
            policy, ref, score >= 0.5, beta, kl=kto_z,
            desirable_weight=cfg.loss.kto_desirable_weight, undesirable_weight=cfg.loss.kto_undesirable_weight,
            weight=weight, n_tokens=n_tokens,
        )  # fmt: skip
    loss_fn = uft_loss if loss_type == "uft" else una_bce_loss
    return loss_fn(policy, ref, score, beta, weight=weight, n_tokens=n_tokens)


# ---------------------------------------------------------------------------------------------------------
# Held-out evaluation (uft_ray.evaluation.heldout).


def evaluate_collective(engine: Engine, cfg: Config, shard: Any, pad_id: int, world: int) -> dict[str, float]:
    """The held-out metrics of every rank's share (no grad, dropout off), whatever the run's loss: pair rows are
    scored as pairs, the others as single responses. The reference is the cache's (joined into the rows) when
    the run has one, else the policy with its adapter off (an `sft` run: r against the base). Every rank runs
    the same number of forwards (a ZeRO-3 forward gathers parameters from all ranks): fewer rows, empty ones."""
    device = ray.train.torch.get_device()
    cached = cfg.reference_from_cache
    parts = []  # (rows of one kind, whether they are pairs)
    for batch in shard.iter_batches(batch_size=cfg.train.micro_batch_size, batch_format="numpy"):
        is_pair = np.asarray([str(k) == "pair" for k in batch["kind"]])
        for flag in (False, True):
            if is_pair[is_pair == flag].size:
                parts.append(({k: v[is_pair == flag] for k, v in batch.items()}, flag))
    (count,) = max_collective([len(parts)])
    records: list[dict[str, Any]] = []
    engine.train(False)
    with torch.no_grad():
        for i in range(int(count)):
            # The reference forward before the policy's, as in training (uft_ray.reference.adapter_off).
            if i >= len(parts):  # an empty forward (and reference forward), to keep the collectives in step
                ids = torch.full((1, 2), pad_id, dtype=torch.long, device=device)
                if not cached:
                    adapter_off_logprobs(engine.peft_model, ids, torch.ones_like(ids), torch.zeros_like(ids))
                model_sequence_logprobs(engine.module, ids, torch.ones_like(ids), torch.zeros_like(ids))
                continue
            batch, pairs = parts[i]
            t = collate(batch, pad_id, device, pairs=pairs, packing=packing_lib.args(cfg))
            ids, attention, mask, packed = t["input_ids"], t["attention_mask"], t["loss_mask"], t.get("packed")
            if cached:
                columns = [REF_LOGP, REF_LOGP_REJECTED] if pairs else [REF_LOGP]
                ref = torch.as_tensor(np.concatenate([batch[c] for c in columns]).astype(np.float64))
            else:
                ref, _ = adapter_off_logprobs(engine.peft_model, ids, attention, mask, packed=packed)
            policy, n_tokens = model_sequence_logprobs(engine.module, ids, attention, mask, packed=packed)
            n = len(batch["row_id"])
            for j in range(n):
                rec = {
                    "source": str(batch["source"][j]),
                    "kind": str(batch["kind"][j]),
                    "score": float(batch["score"][j]),
                    "policy": float(policy[j]),
                    "ref": float(ref[j]),
                    "n_tokens": int(n_tokens[j]),
                }
                if pairs:
                    rec |= {"policy_rejected": float(policy[n + j]), "ref_rejected": float(ref[n + j]),
                            "n_tokens_rejected": int(n_tokens[n + j])}  # fmt: skip
                records.append(rec)
    engine.train(True)
    return heldout.metrics([r for g in records_collective(records, world) for r in g], cfg)


# ---------------------------------------------------------------------------------------------------------
# Metrics: per-rank records, gathered over all ranks once per step.


class _StepRecord:
    """What one rank saw during one step: per-row values by name and source, token counts, waits."""

    def __init__(self) -> None:
        self.sources: list[str] = []
        self.kinds: list[str] = []
        self.rows: dict[str, list[float]] = {}
        self.tokens = 0
        self.padded = 0
        self.computed = 0
        self.wait_s = 0.0
        self.scaled_loss = 0.0
        self.lr = 0.0
        self.epoch = 0
        self.kto_z: float | None = None  # KTO's reference point: one value per step, the same on every rank

    def add(self, batch: dict[str, np.ndarray], tensors: dict[str, Any], metrics: dict, scaled_loss: float) -> None:
        self.sources += [str(s) for s in batch["source"]]
        self.kinds += [str(k) for k in batch["kind"]]
        for key, value in metrics.items():
            if key.startswith("rows/"):
                self.rows.setdefault(key, []).extend(value.double().cpu().tolist())
        self.tokens += tensors["tokens"]
        self.padded += tensors["padded"]
        self.computed += tensors["computed"]
        self.scaled_loss += scaled_loss
        self.epoch = int(batch["epoch"][0])
        if "kto_z" in metrics:
            self.kto_z = float(metrics["kto_z"])


def _aggregate_collective(acc: _StepRecord, world: int) -> dict[str, Any]:
    """Gather every rank's record; every rank gets the same global result."""
    gathered = records_collective(acc.__dict__, world)
    sources = [s for g in gathered for s in g["sources"]]
    rows = {k: torch.tensor([v for g in gathered for v in g["rows"].get(k, [])]) for k in gathered[0]["rows"]}
    return {
        "rows": rows,
        "sources": sources,
        "kinds": [k for g in gathered for k in g["kinds"]],
        "per_source": per_source_metrics(rows, sources),
        "rows_by_source": {s: sources.count(s) for s in dict.fromkeys(sources)},
        "n_rows": len(sources),
        "tokens": sum(g["tokens"] for g in gathered),
        "padded": sum(g["padded"] for g in gathered),
        "computed": sum(g["computed"] for g in gathered),
        "wait_s": sum(g["wait_s"] for g in gathered) / world,
        "scaled_loss": sum(g["scaled_loss"] for g in gathered),
        "lr": gathered[0]["lr"],
        "epoch": gathered[0]["epoch"],
        "kto_z": gathered[0]["kto_z"],
    }


def saturation_warning(row: dict[str, Any], step: int, total_steps: int, beta: float) -> str | None:
    """The warning line when instruction rows saturate early: in the run's first quarter of steps, at least half of
    a source's SFT rows have sigmoid(r) > SATURATED (uft_ray.losses: their pull is under 8% of SFT's at the
    start). None otherwise. A run whose skill is already learned by then may ignore it; one whose per-token NLL
    is still high is stuck, and a lower loss.beta (kappa near 1) lets the rows teach longer."""
    if step + 1 > max(1, -(-total_steps // 4)):
        return None
    hot = {k.removeprefix("saturated/"): v for k, v in row.items() if k.startswith("saturated/") and v >= 0.5}
    if not hot:
        return None
    which = ", ".join(f"{s} {v:.0%}" for s, v in sorted(hot.items()))
    kappas = ", ".join(f"{k.removeprefix('kappa/')} {v:.3g}" for k, v in sorted(row.items()) if k.startswith("kappa/"))
    return (
        f"[uft-ray] warning: step {step + 1} of {total_steps}: SFT rows with sigmoid(r) > {SATURATED:g} ({which}) no "
        f"longer teach: UFT's pull on an SFT row is SFT's scaled by 2 n beta sigmoid(r)(1 - sigmoid(r))^2, which "
        f"fades once a row's log-ratio to the reference is about 2/beta = {2 / beta:.3g} nats"
        + (f" (kappa at step 0: {kappas})" if kappas else "")
        + ". If their per-token NLL is still high, lower loss.beta (kappa about 1 or below)."
    )


def _metrics_row(
    record: dict[str, Any],
    state: dict[str, Any],
    config: dict[str, Any],
    step: int,
    step_time: float,
    loss_divisor: int,
    grad_norm: float,
) -> dict[str, Any]:
    """One metrics.jsonl line under the names of docs/internals.md "Metrics"."""
    sources, target = config["sources"], config["target_fraction"]
    consumed_total = sum(state["consumed"].values())
    row: dict[str, Any] = {
        "step": step + 1,
        "epoch": record["epoch"],
        "time": time.time(),
        # uft_ray.losses: the global loss is the all-reduced sum of the scaled losses / (world * grad_accum).
        "loss": record["scaled_loss"] / loss_divisor,
    }
    row.update({k: v for k, v in sorted(record["per_source"].items()) if not k.startswith("rows/")})
    for s in sources:
        n = record["rows_by_source"].get(s, 0)
        row[f"rows/{s}"] = n
        row[f"mixture/{s}/target"] = target.get(s, 0.0)
        row[f"mixture/{s}/step"] = n / record["n_rows"]
        row[f"mixture/{s}/cumulative"] = state["consumed"].get(s, 0) / consumed_total
    row.update(
        {
            "tokens_per_s": record["tokens"] / step_time,
            "samples_per_s": record["n_rows"] / step_time,
            # positions computed that hold no token (packed: a shared prompt is one computed token, not two)
            "padding_frac": 1.0 - record["computed"] / record["padded"],
            "data_wait_frac": min(record["wait_s"] / step_time, 1.0),
            "step_time_s": step_time,
            "lr": record["lr"],
            "grad_norm": grad_norm,
        }
    )
    if record["kto_z"] is not None:
        row["kto_z"] = record["kto_z"]
    return row


# ---------------------------------------------------------------------------------------------------------
# State, checkpoints and files.


def _initial_state(cfg: Config, sources: list[str]) -> dict[str, Any]:
    return {
        "step": 0,
        "consumed": dict.fromkeys(sources, 0),
        "seeds": {"data": cfg.data.seed, "train": cfg.train.seed},
    }
