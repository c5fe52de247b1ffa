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

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from uft_ray.config import Config, load_config
from uft_ray.logprobs import model_sequence_logprobs
from uft_ray.losses import dpo_loss, kto_loss, per_source_metrics, rank_scale, sft_loss, uft_loss, una_bce_loss
from uft_ray.reference.adapter_off import adapter_off_logprobs
from uft_ray.run_dir import CHECKPOINT_ADAPTER, RunDir, checkpoint_name, read_state, write_state
from uft_ray.schema import REF_LOGP, REF_LOGP_REJECTED
from uft_ray.train.engine import Engine, base_model_bytes, build_engine, choose_zero_stage, device_memory_bytes
from uft_ray.train.hooks import TrainHooks


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg = load_config(config["cfg"], check_paths=False, resolve_paths=False)
    run, total_steps, sources = RunDir(config["run_dir"]), int(config["steps"]), list(config["sources"])
    hooks: TrainHooks = config.get("hooks") or TrainHooks()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = cfg.train.use_gpu and torch.cuda.is_available()
    device = ray.train.torch.get_device()
    mb, ga = cfg.train.micro_batch_size, cfg.train.grad_accum
    if world != cfg.train.num_workers:  # the plan dealt micro-batches to num_workers ranks
        raise RuntimeError(f"world size {world} != train.num_workers {cfg.train.num_workers}")
    if not use_gpu:  # a CPU worker computes with the CPUs Ray gave it (Ray's default for a worker is 1 thread)
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    zero_stage = _zero_stage(cfg, world, ctx.get_local_world_size(), use_gpu, rank)

    # 1. Where to start: the last checkpoint's driver state (step, rows consumed per source, seeds), or step 0.
    with _checkpoint_dir(ray.train.get_checkpoint()) as ckpt:
        state = read_state(ckpt) if ckpt else _initial_state(cfg, sources)
        start = int(state["step"])
        # 2. This rank's planned micro-batches, in plan order, from step `start` on; the first one is fetched in
        # the background from now on, so that the data pipeline starts while the model loads.
        batches = _FirstAhead(_planned_micro_batches(ray.train.get_dataset_shard(f"train_{rank}"), start, mb))
        # 3. The policy under DeepSpeed; on resume its adapter, optimizer and scheduler come back as saved.
        engine = build_engine(
            cfg,
            total_steps=total_steps,
            use_gpu=use_gpu,
            zero_stage=zero_stage,
            adapter=os.path.join(ckpt, CHECKPOINT_ADAPTER) if ckpt else None,
        )
        if ckpt:
            engine.load(ckpt)
    if rank == 0:
        run.truncate_metrics(keep_through=start)
    heldout = ray.train.get_dataset_shard(f"eval_{rank}") if config.get("heldout") else None
    if heldout is not None and start == 0:  # the baseline: the policy is still the reference (r = 0)
        baseline = {"step": 0, "time": time.time(), **evaluate_heldout(engine, cfg, heldout, config["pad_id"], world)}
        if rank == 0:
            run.append_metrics(baseline)
    hooks.on_start(engine, rank=rank, start_step=start)

    engine.train()
    for step in range(start, total_steps):
        # Dropout masks depend on (seed, step, rank) only: a resumed run draws the same ones.
        torch.manual_seed(int(np.random.SeedSequence([cfg.train.seed, step, rank]).generate_state(1)[0]))
        t_step = time.perf_counter()
        acc = _StepRecord()
        step_batches = []
        for micro in range(ga):
            t0 = time.perf_counter()
            batch = next(batches)
            acc.wait_s += time.perf_counter() - t0
            _check_plan_position(batch, step, micro, rank)
            step_batches.append((batch, collate(batch, config["pad_id"], device, pairs=cfg.loss.type == "dpo")))
        kto_z = kto_reference_point(engine, cfg, step_batches) if cfg.loss.type == "kto" else None
        for micro, (batch, tensors) in enumerate(step_batches):
            loss, metrics = micro_batch_loss(engine, cfg, batch, tensors, kto_z=kto_z)
            scaled = loss * rank_scale(len(batch["row_id"]), cfg.train.global_batch_size, world, ga)
            acc.lr = engine.lr  # the rate this update uses (the scheduler moves on at the step)
            engine.backward(scaled)
            engine.step()
            acc.add(batch, tensors, metrics, float(scaled.detach()))
            hooks.on_micro_batch(rank=rank, step=step, micro=micro, batch=batch)
        step_time = time.perf_counter() - t_step

        # 4. The step's metrics over the whole global batch (every rank takes part: a collective).
        record = _aggregate(acc, world)
        for source, n in record["rows_by_source"].items():
            state["consumed"][source] = state["consumed"].get(source, 0) + n
        state["step"] = step + 1
        row = _metrics_row(record, state, config, step, step_time, world * ga, engine.grad_norm)
        every = cfg.eval.every
        if heldout is not None and ((every and (step + 1) % every == 0) or step + 1 == total_steps):
            t_eval = time.perf_counter()
            row.update(evaluate_heldout(engine, cfg, heldout, config["pad_id"], world))
            row["time/eval_s"] = time.perf_counter() - t_eval  # not part of step_time_s
        if rank == 0:
            run.append_metrics(row)

        # 5. Checkpoint: adapter + optimizer/scheduler + driver state, through Ray Train.
        if state["step"] % cfg.train.checkpoint_every == 0 or state["step"] == total_steps:
            _save_checkpoint(engine, state, row, rank)
        hooks.on_step_end(rank=rank, step=step + 1)

    hooks.on_end(engine, rank=rank, cfg=cfg, pad_id=config["pad_id"], device=device)


def _zero_stage(cfg: Config, world: int, local_world: int, use_gpu: bool, rank: int) -> int:
    """`choose_zero_stage` on every rank, agreed on by all (the largest wins: one rank that cannot hold the base
    makes every rank shard it; ranks disagreeing on the stage would hang in the first collective)."""
    device_bytes = device_memory_bytes(use_gpu, local_world)
    stage, why = choose_zero_stage(cfg, world, device_bytes, base_model_bytes(cfg))
    agreed = torch.tensor([stage], dtype=torch.int64, device=ray.train.torch.get_device())
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    if int(agreed) != stage:
        why = "another rank cannot hold the frozen base: every rank shards it"
    if rank == 0:
        threads = "" if use_gpu else f", {torch.get_num_threads()} CPU threads per worker"
        print(f"[uft-ray] DeepSpeed ZeRO-{int(agreed)}: {why}{threads}", flush=True)
    return int(agreed)


# ---------------------------------------------------------------------------------------------------------
# Data: the planned micro-batches of this rank, padded per micro-batch.


class _FirstAhead:
    """An iterator whose first item is fetched by a background thread from construction on.

    The first `next` of a rank's dataset starts its whole pipeline (read, plan join, sort); started before
    the model is built, that wait overlaps the model load instead of adding to it. Later items come straight
    from the wrapped iterator, in the caller's thread.
    """

    def __init__(self, it: Iterator[Any]) -> None:
        self._it = it
        self._first: Any = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = threading.Thread(target=self._fetch, name="uft-ray-first-batch")
        self._thread.daemon = True
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first = next(self._it)
        except BaseException as e:  # StopIteration included: re-raised in the caller's thread
            self._error = e

    def __iter__(self) -> _FirstAhead:
        return self

    def __next__(self) -> Any:
        if self._thread is None:
            return next(self._it)
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise self._error
        return self._first


def _planned_micro_batches(shard: Any, start: int, micro_batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Micro-batches of this rank in plan order; those of steps before `start` (a restarted attempt) skipped."""
    for batch in shard.iter_batches(batch_size=micro_batch_size, batch_format="numpy", prefetch_batches=2):
        if int(batch["step"][0]) >= start:
            yield batch


def _check_plan_position(batch: dict[str, np.ndarray], step: int, micro: int, rank: int) -> None:
    # The whole exact-resume guarantee rests on this order: fail loudly rather than train the wrong rows.
    steps, micros, slots = batch["step"], batch["micro"], batch["slot"]
    if not ((steps == step).all() and (micros == micro).all() and (slots == np.arange(len(slots))).all()):
        raise RuntimeError(
            f"rank {rank}: expected plan step {step} micro-batch {micro}, got steps {steps.tolist()} "
            f"micro {micros.tolist()} slots {slots.tolist()}: the data did not arrive in plan order"
        )


def _pad(seqs: list[np.ndarray], starts: list[int], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence here; the loss mask covers the response tokens (and EOS)."""
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), longest), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, (s, r) in enumerate(zip(seqs, starts, strict=True)):
        ids[i, : len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        attention[i, : len(s)] = 1
        loss_mask[i, int(r) : len(s)] = 1
    return {"input_ids": ids.to(device), "attention_mask": attention.to(device), "loss_mask": loss_mask.to(device)}


def collate(batch: dict[str, np.ndarray], pad_id: int, device: torch.device, *, pairs: bool) -> dict[str, Any]:
    """Tensors of one micro-batch. Pairs: chosen rows then rejected rows, padded together for one forward."""
    seqs, starts = list(batch["input_ids"]), [int(x) for x in batch["response_start"]]
    if pairs:
        seqs += list(batch["rejected_input_ids"])
        starts += [int(x) for x in batch["rejected_response_start"]]
    out: dict[str, Any] = _pad(seqs, starts, pad_id, device)
    out["tokens"] = int(sum(len(s) for s in seqs))
    out["padded"] = int(out["input_ids"].numel())
    return out


# ---------------------------------------------------------------------------------------------------------
# The loss of one micro-batch.


def _reference_logprobs(
    engine: Engine, cfg: Config, batch: dict[str, np.ndarray], tensors: dict[str, Any], device: torch.device
) -> torch.Tensor:
    """Reference log-probs of a micro-batch (chosen then rejected for pairs): the joined cache columns, or the
    same forward with LoRA disabled (`reference.mode: adapter_off`, no grad)."""
    if cfg.reference.mode == "adapter_off":
        ref, _ = adapter_off_logprobs(
            engine.peft_model, tensors["input_ids"], tensors["attention_mask"], tensors["loss_mask"]
        )
        return ref
    columns = [REF_LOGP, REF_LOGP_REJECTED] if cfg.loss.type == "dpo" else [REF_LOGP]
    return torch.as_tensor(np.concatenate([batch[c] for c in columns]).astype(np.float64), device=device)


def kto_reference_point(engine: Engine, cfg: Config, step_batches: list[tuple[dict, dict]]) -> float | None:
    """KTO's z for the whole optimizer step: the mean log-ratio over every row of the global batch.

    One estimate per step (as uft_ray.losses documents), whatever the split into ranks and micro-batches, so
    the loss does not change with `grad_accum`. With one micro-batch per step the training forward itself
    gives it (None here: `micro_batch_loss` all-reduces it); with more, a no-grad forward over the step's
    micro-batches first (a forward costs about a third of a training step).
    """
    if len(step_batches) == 1:
        return None
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for batch, t in step_batches:
            policy, _ = model_sequence_logprobs(engine.module, t["input_ids"], t["attention_mask"], t["loss_mask"])
            ref = _reference_logprobs(engine, cfg, batch, t, policy.device)
            total += torch.tensor([float((policy.double() - ref.double()).sum()), float(len(batch["row_id"]))])
    total = total.to(ray.train.torch.get_device())
    dist.all_reduce(total)
    return float(total[0] / total[1])


def micro_batch_loss(
    engine: Engine,
    cfg: Config,
    batch: dict[str, np.ndarray],
    tensors: dict[str, Any],
    *,
    kto_z: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy log-probs, reference log-probs and `loss.type`'s loss (uft_ray.losses) for one micro-batch.

    `kto_z`: KTO's reference point for this optimizer step (`kto_reference_point`); None: this micro-batch is
    the rank's whole step, and z is all-reduced from it here.
    """
    n = len(batch["row_id"])
    ids, attention, loss_mask = tensors["input_ids"], tensors["attention_mask"], tensors["loss_mask"]
    policy, n_tokens = model_sequence_logprobs(engine.module, ids, attention, loss_mask)
    device = policy.device
    weights = cfg.loss.source_weights or {}
    weight = torch.tensor([weights.get(s, 1.0) for s in batch["source"]], dtype=policy.dtype, device=device)
    loss_type, beta = cfg.loss.type, cfg.loss.beta

    if loss_type == "sft":
        return sft_loss(policy, n_tokens, weight=weight)
    ref = _reference_logprobs(engine, cfg, batch, tensors, device)
    if loss_type == "dpo":
        return dpo_loss(
            policy[:n], policy[n:], ref[:n], ref[n:], beta, weight=weight,
            n_tokens_chosen=n_tokens[:n], n_tokens_rejected=n_tokens[n:],
        )  # fmt: skip
    score = torch.as_tensor(batch["score"].astype(np.float64), device=device)
    if loss_type == "kto":
        if kto_z is None:  # every rank's micro-batch is the step: all-reduce z from this forward
            stats = torch.tensor([float((policy.detach() - ref).sum()), float(n)], dtype=torch.float64, device=device)
            dist.all_reduce(stats)
            kto_z = float(stats[0] / stats[1])
        return kto_loss(
            policy, ref, score >= 0.5, beta, kl=kto_z,
            desirable_weight=cfg.loss.kto_desirable_weight, undesirable_weight=cfg.loss.kto_undesirable_weight,
            weight=weight, n_tokens=n_tokens,
        )  # fmt: skip
    loss_fn = uft_loss if loss_type == "uft" else una_bce_loss
    return loss_fn(policy, ref, score, beta, weight=weight, n_tokens=n_tokens)


# ---------------------------------------------------------------------------------------------------------
# Held-out evaluation (uft_ray.evaluation.heldout).


def evaluate_heldout(engine: Engine, cfg: Config, shard: Any, pad_id: int, world: int) -> dict[str, float]:
    """The held-out metrics of every rank's share (no grad, dropout off), whatever the run's loss: pair rows are
    scored as pairs, the others as single responses. The reference is the cache's (joined into the rows) when
    the run has one, else the policy with its adapter off (an `sft` run: r against the base). Every rank runs
    the same number of forwards (a ZeRO-3 forward gathers parameters from all ranks): fewer rows, empty ones."""
    from uft_ray.evaluation import heldout

    device = ray.train.torch.get_device()
    cached = cfg.needs_reference and cfg.reference.mode == "actor"
    parts = []  # (rows of one kind, whether they are pairs)
    for batch in shard.iter_batches(batch_size=cfg.train.micro_batch_size, batch_format="numpy"):
        is_pair = np.asarray([str(k) == "pair" for k in batch["kind"]])
        for flag in (False, True):
            if is_pair[is_pair == flag].size:
                parts.append(({k: v[is_pair == flag] for k, v in batch.items()}, flag))
    count = torch.tensor([len(parts)], dtype=torch.int64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    records: list[dict[str, Any]] = []
    engine.train(False)
    with torch.no_grad():
        for i in range(int(count)):
            if i >= len(parts):  # an empty forward (and reference forward), to keep the collectives in step
                ids = torch.full((1, 2), pad_id, dtype=torch.long, device=device)
                model_sequence_logprobs(engine.module, ids, torch.ones_like(ids), torch.zeros_like(ids))
                if not cached:
                    adapter_off_logprobs(engine.peft_model, ids, torch.ones_like(ids), torch.zeros_like(ids))
                continue
            batch, pairs = parts[i]
            t = collate(batch, pad_id, device, pairs=pairs)
            ids, attention, mask = t["input_ids"], t["attention_mask"], t["loss_mask"]
            policy, n_tokens = model_sequence_logprobs(engine.module, ids, attention, mask)
            if cached:
                columns = [REF_LOGP, REF_LOGP_REJECTED] if pairs else [REF_LOGP]
                ref = torch.as_tensor(np.concatenate([batch[c] for c in columns]).astype(np.float64))
            else:
                ref, _ = adapter_off_logprobs(engine.peft_model, ids, attention, mask)
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
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, records)
    return heldout.metrics([r for g in gathered for r in g], cfg)


# ---------------------------------------------------------------------------------------------------------
# Metrics: per-rank records, gathered over all ranks once per step.


class _StepRecord:
    """What one rank saw during one step: per-row values by name and source, token counts, waits."""

    def __init__(self) -> None:
        self.sources: list[str] = []
        self.rows: dict[str, list[float]] = {}
        self.tokens = 0
        self.padded = 0
        self.wait_s = 0.0
        self.scaled_loss = 0.0
        self.lr = 0.0
        self.epoch = 0
        self.kto_z: float | None = None  # KTO's reference point: one value per step, the same on every rank

    def add(self, batch: dict[str, np.ndarray], tensors: dict[str, Any], metrics: dict, scaled_loss: float) -> None:
        self.sources += [str(s) for s in batch["source"]]
        for key, value in metrics.items():
            if key.startswith("rows/"):
                self.rows.setdefault(key, []).extend(value.double().cpu().tolist())
        self.tokens += tensors["tokens"]
        self.padded += tensors["padded"]
        self.scaled_loss += scaled_loss
        self.epoch = int(batch["epoch"][0])
        if "kto_z" in metrics:
            self.kto_z = float(metrics["kto_z"])


def _aggregate(acc: _StepRecord, world: int) -> dict[str, Any]:
    """Gather every rank's record; every rank gets the same global result."""
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, acc.__dict__)
    sources = [s for g in gathered for s in g["sources"]]
    rows = {k: torch.tensor([v for g in gathered for v in g["rows"].get(k, [])]) for k in gathered[0]["rows"]}
    return {
        "per_source": per_source_metrics(rows, sources),
        "rows_by_source": {s: sources.count(s) for s in dict.fromkeys(sources)},
        "n_rows": len(sources),
        "tokens": sum(g["tokens"] for g in gathered),
        "padded": sum(g["padded"] for g in gathered),
        "wait_s": sum(g["wait_s"] for g in gathered) / world,
        "scaled_loss": sum(g["scaled_loss"] for g in gathered),
        "lr": gathered[0]["lr"],
        "epoch": gathered[0]["epoch"],
        "kto_z": gathered[0]["kto_z"],
    }


def _metrics_row(
    record: dict[str, Any],
    state: dict[str, Any],
    config: dict[str, Any],
    step: int,
    step_time: float,
    loss_divisor: int,
    grad_norm: float,
) -> dict[str, Any]:
    """One metrics.jsonl line under the DESIGN.md names (docs/internals.md "Metrics")."""
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
            "padding_frac": 1.0 - record["tokens"] / record["padded"],
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


@contextlib.contextmanager
def _checkpoint_dir(checkpoint: ray.train.Checkpoint | None) -> Iterator[str | None]:
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as d:
        yield d


def _save_checkpoint(engine: Engine, state: dict[str, Any], metrics: dict[str, Any], rank: int) -> None:
    """Every rank writes its part (rank 0: adapter + state; each: its optimizer partition); Ray merges them."""
    with tempfile.TemporaryDirectory(prefix="uft-ckpt-") as d:
        engine.save(d, rank=rank)
        if rank == 0:
            write_state(d, state)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_dir_name=checkpoint_name(state["step"]),
        )
