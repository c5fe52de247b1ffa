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
`target_fraction`, `pad_id`, and `debug` (tests only: record consumed rows and parameter digests, or stop
after a step).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
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
from uft_ray.reference import adapter_off_logprobs
from uft_ray.schema import REF_LOGP, REF_LOGP_REJECTED
from uft_ray.train.engine import Engine, build_engine

STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg = load_config(config["cfg"], check_paths=False)
    run_dir, total_steps, sources = config["run_dir"], int(config["steps"]), list(config["sources"])
    debug = Debug(config.get("debug") or {}, run_dir)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = cfg.train.use_gpu and torch.cuda.is_available()
    device = ray.train.torch.get_device()
    mb, ga = cfg.train.micro_batch_size, cfg.train.grad_accum
    global_rows = mb * ga * world  # every planned micro-batch is full

    # 1. Where to start: the last checkpoint's driver state (step, rows consumed per source, seeds), or step 0.
    with _checkpoint_dir(ray.train.get_checkpoint()) as ckpt:
        state = _read_state(ckpt) if ckpt else _initial_state(cfg, sources)
        # 2. The policy under DeepSpeed; on resume its adapter, optimizer and scheduler come back as saved.
        engine = build_engine(
            cfg,
            world_size=world,
            total_steps=total_steps,
            use_gpu=use_gpu,
            adapter=os.path.join(ckpt, "adapter") if ckpt else None,
        )
        if ckpt:
            engine.load(ckpt)
    start = int(state["step"])
    if rank == 0:
        _truncate_jsonl(os.path.join(run_dir, METRICS_FILE), keep_through=start)
    debug.on_start(engine, rank, start)

    # 3. This rank's planned micro-batches, in plan order, from step `start` on.
    batches = _planned_micro_batches(ray.train.get_dataset_shard(f"train_{rank}"), start, mb)
    engine.train()
    for step in range(start, total_steps):
        # Dropout masks depend on (seed, step, rank) only: a resumed run draws the same ones.
        torch.manual_seed(int(np.random.SeedSequence([cfg.train.seed, step, rank]).generate_state(1)[0]))
        t_step = time.perf_counter()
        acc = _StepRecord()
        for micro in range(ga):
            t0 = time.perf_counter()
            batch = next(batches)
            acc.wait_s += time.perf_counter() - t0
            _check_plan_position(batch, step, micro, rank)
            tensors = collate(batch, config["pad_id"], device, pairs=cfg.loss.type == "dpo")
            loss, metrics = micro_batch_loss(engine, cfg, batch, tensors)
            scaled = loss * rank_scale(len(batch["row_id"]), global_rows, world, ga)
            acc.lr = engine.lr  # the rate this update uses (the scheduler moves on at the step)
            engine.backward(scaled)
            engine.step()
            acc.add(batch, tensors, metrics, float(scaled.detach()))
            debug.on_micro_batch(rank, step, micro, batch)
        step_time = time.perf_counter() - t_step

        # 4. The step's metrics over the whole global batch (every rank takes part: a collective).
        record = _aggregate(acc, world)
        for source, n in record["rows_by_source"].items():
            state["consumed"][source] = state["consumed"].get(source, 0) + n
        state["step"] = step + 1
        row = _metrics_row(record, state, config, step, step_time, world * ga, engine.grad_norm)
        if rank == 0:
            _append_jsonl(os.path.join(run_dir, METRICS_FILE), row)

        # 5. Checkpoint: adapter + optimizer/scheduler + driver state, through Ray Train.
        if state["step"] % cfg.train.checkpoint_every == 0 or state["step"] == total_steps:
            _save_checkpoint(engine, state, row, rank)
        debug.on_step_end(rank, step + 1)

    debug.on_end(engine, rank, cfg, config["pad_id"], device)


# ---------------------------------------------------------------------------------------------------------
# Data: the planned micro-batches of this rank, padded per micro-batch.


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


def micro_batch_loss(
    engine: Engine, cfg: Config, batch: dict[str, np.ndarray], tensors: dict[str, Any]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy log-probs, reference log-probs and `loss.type`'s loss (uft_ray.losses) for one micro-batch."""
    n = len(batch["row_id"])
    ids, attention, loss_mask = tensors["input_ids"], tensors["attention_mask"], tensors["loss_mask"]
    policy, n_tokens = model_sequence_logprobs(engine.module, ids, attention, loss_mask)
    device = policy.device
    weights = cfg.loss.source_weights or {}
    weight = torch.tensor([weights.get(s, 1.0) for s in batch["source"]], dtype=policy.dtype, device=device)
    loss_type, beta = cfg.loss.type, cfg.loss.beta

    if loss_type == "sft":
        return sft_loss(policy, n_tokens, weight=weight)

    if cfg.reference.mode == "adapter_off":
        # The same forward with LoRA disabled, through the reference service's own function (no grad).
        ref, _ = adapter_off_logprobs(engine.peft_model, ids, attention, loss_mask)
    else:
        columns = [REF_LOGP, REF_LOGP_REJECTED] if loss_type == "dpo" else [REF_LOGP]
        ref = torch.as_tensor(np.concatenate([batch[c] for c in columns]).astype(np.float64), device=device)

    if loss_type == "dpo":
        return dpo_loss(
            policy[:n], policy[n:], ref[:n], ref[n:], beta, weight=weight,
            n_tokens_chosen=n_tokens[:n], n_tokens_rejected=n_tokens[n:],
        )  # fmt: skip
    score = torch.as_tensor(batch["score"].astype(np.float64), device=device)
    if loss_type == "kto":
        # z: the mean log-ratio over every rank's micro-batch, so that all ranks use the same reference point.
        stats = torch.tensor([float((policy.detach() - ref).sum()), float(n)], dtype=torch.float64, device=device)
        dist.all_reduce(stats)
        return kto_loss(
            policy, ref, score >= 0.5, beta, kl=float(stats[0] / stats[1]),
            desirable_weight=cfg.loss.kto_desirable_weight, undesirable_weight=cfg.loss.kto_undesirable_weight,
            weight=weight, n_tokens=n_tokens,
        )  # fmt: skip
    loss_fn = uft_loss if loss_type == "uft" else una_bce_loss
    return loss_fn(policy, ref, score, beta, weight=weight, n_tokens=n_tokens)


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

    def add(self, batch: dict[str, np.ndarray], tensors: dict[str, Any], metrics: dict, scaled_loss: float) -> None:
        self.sources += [str(s) for s in batch["source"]]
        for key, value in metrics.items():
            if key.startswith("rows/"):
                self.rows.setdefault(key, []).extend(value.double().cpu().tolist())
        self.tokens += tensors["tokens"]
        self.padded += tensors["padded"]
        self.scaled_loss += scaled_loss
        self.epoch = int(batch["epoch"][0])


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
    return row


# ---------------------------------------------------------------------------------------------------------
# State, checkpoints and files.


def _initial_state(cfg: Config, sources: list[str]) -> dict[str, Any]:
    return {
        "step": 0,
        "consumed": dict.fromkeys(sources, 0),
        "seeds": {"data": cfg.data.seed, "train": cfg.train.seed},
    }


def _read_state(ckpt: str) -> dict[str, Any]:
    with open(os.path.join(ckpt, STATE_FILE)) as f:
        return json.load(f)


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
            with open(os.path.join(d, STATE_FILE), "w") as f:
                json.dump(state, f, indent=1)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_dir_name=f"checkpoint_{state['step']:06d}",
        )


def _append_jsonl(path: str, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_jsonl(path: str, keep_through: int) -> None:
    """Drop lines of steps after `keep_through`: they were written after the checkpoint we resume from."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= keep_through]
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------------------
# Test hooks: off unless the driver is called with `debug=...`.


class Debug:
    """Records for the integration tests: consumed rows, parameter digests, pids, final log-probs; a stop."""

    def __init__(self, options: dict[str, Any], run_dir: str):
        self.record = bool(options.get("record"))
        self.stop_after_step = options.get("stop_after_step")
        self.pause = options.get("pause")  # {"rank": r, "step": k}: rank r waits after step k to be killed
        self.dir = os.path.join(run_dir, "debug")
        self.last_batch: dict[str, np.ndarray] | None = None
        if self.record or self.stop_after_step or self.pause:
            os.makedirs(self.dir, exist_ok=True)

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def on_start(self, engine: Engine, rank: int, start: int) -> None:
        if not self.record:
            return
        _append_jsonl(self._path(f"attempts_rank{rank}.jsonl"), {"pid": os.getpid(), "start_step": start})
        _truncate_jsonl(self._path(f"consumed_rank{rank}.jsonl"), keep_through=start)
        digests = engine.parameter_digests()  # collective
        if rank == 0 and start == 0:
            with open(self._path("digests_start.json"), "w") as f:
                json.dump({"digests": digests, "sharded_at_load": engine.sharded_at_load}, f)

    def on_micro_batch(self, rank: int, step: int, micro: int, batch: dict[str, np.ndarray]) -> None:
        self.last_batch = batch
        if self.record:
            # "step" is 1-based like metrics.jsonl, so truncation on resume keeps the same steps in both.
            row = {"step": step + 1, "micro": micro, "row_ids": [str(r) for r in batch["row_id"]]}
            _append_jsonl(self._path(f"consumed_rank{rank}.jsonl"), row)

    def on_step_end(self, rank: int, step: int) -> None:
        if self.stop_after_step is not None and step == self.stop_after_step:
            raise RuntimeError(f"debug: stopping after step {step}")
        marker = self._path(f"paused_rank{rank}.json")
        if self.pause and rank == self.pause["rank"] and step == self.pause["step"] and not os.path.exists(marker):
            # Once per run: the test kills this process by its pid; the restarted worker runs on.
            with open(marker + ".tmp", "w") as f:
                json.dump({"pid": os.getpid(), "step": step}, f)
            os.replace(marker + ".tmp", marker)
            time.sleep(300)
            raise RuntimeError("debug: paused worker was not killed")

    def on_end(self, engine: Engine, rank: int, cfg: Config, pad_id: int, device: torch.device) -> None:
        if not self.record:
            return
        digests = engine.parameter_digests()
        # The trained policy's log-probs of this rank's last micro-batch, for the saved-adapter test.
        engine.train(False)
        batch = self.last_batch
        if batch is None:
            return
        t = collate(batch, pad_id, device, pairs=False)
        with torch.no_grad():
            logp, _ = model_sequence_logprobs(engine.module, t["input_ids"], t["attention_mask"], t["loss_mask"])
        with open(self._path(f"final_logp_rank{rank}.json"), "w") as f:
            json.dump({"row_ids": [str(r) for r in batch["row_id"]], "logp": logp.double().tolist()}, f)
        if rank == 0:
            with open(self._path("digests_end.json"), "w") as f:
                json.dump({"digests": digests}, f)
