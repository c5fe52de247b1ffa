"""A training worker's setup and bookkeeping, shared by both per-worker loops (uft_ray.train.loop for the
offline losses, uft_ray.rft.loop for hint_rft), which keep their steps and read top to bottom.

- `join(config)`: the run config, this rank's place in the world (which must be the planned one), the CPU
  threads Ray gave the worker;
- `restore(...)`: where to start (the last checkpoint's state, or the method's initial state), this rank's feed
  from there on (its first item fetched in the background while the model loads), the DeepSpeed engine with the
  ZeRO stage all ranks agree on (a collective), restored on resume; rank 0 cuts metrics.jsonl back to the start;
- `seed_step`, `checkpoint_due`, `save_checkpoint`: per-step seeding (a resumed run draws the same dropout
  masks), the checkpoint cadence, and the save through Ray Train (each rank writes its part).

Helpers that run collectives say so in their names (`agree_`, `_collective`): every rank must call them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from uft_ray.config import Config, load_config
from uft_ray.console import say  # a worker's `[uft-ray]` lines (not `print`: Ray Train patches it in its workers)
from uft_ray.resources import worker_threads
from uft_ray.run_dir import CHECKPOINT_ADAPTER, RunDir, checkpoint_name, read_state, write_state
from uft_ray.train.engine import Engine, base_model_bytes, build_engine, choose_zero_stage, device_memory_bytes
from uft_ray.train.hooks import TrainHooks
from uft_ray.train.nonfinite import Skips


@dataclass
class Worker:
    cfg: Config
    run: RunDir
    hooks: TrainHooks
    rank: int
    world: int
    local_world: int
    use_gpu: bool
    device: torch.device


def join(config: dict[str, Any]) -> Worker:
    """This rank's view of the run (see the module docstring); fails when the world is not the planned one."""
    cfg = load_config(config["cfg"], check_paths=False, resolve_paths=False)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if world != cfg.train.num_workers:  # the plan dealt the rows to num_workers ranks
        raise RuntimeError(f"world size {world} != train.num_workers {cfg.train.num_workers}")
    use_gpu = cfg.train.use_gpu and torch.cuda.is_available()
    if not use_gpu:  # a CPU worker computes with the CPUs Ray gave it (Ray's default for a worker is 1 thread)
        torch.set_num_threads(worker_threads(float(cfg.train.cpus_per_worker)))
    return Worker(
        cfg=cfg,
        run=RunDir(config["run_dir"]),
        hooks=config.get("hooks") or TrainHooks(),
        rank=rank,
        world=world,
        local_world=ctx.get_local_world_size(),
        use_gpu=use_gpu,
        device=ray.train.torch.get_device(),
    )


def restore(
    w: Worker,
    *,
    initial_state: dict[str, Any],
    optimizer_steps: int,
    feed: Callable[[int], Iterator[Any]],
    reference_adapter: str | None = None,
) -> tuple[dict[str, Any], int, Iterator[Any], Engine]:
    """(state, start step, this rank's feed from `start` on, engine); see the module docstring.

    `reference_adapter`: loaded beside the policy's as a frozen second adapter (`build_engine`), the same on
    resume (the checkpoint holds only the trained one)."""
    zero_stage = agree_zero_stage(w)
    with _checkpoint_dir(ray.train.get_checkpoint()) as ckpt:
        state = read_state(ckpt) if ckpt else initial_state
        start = int(state["step"])
        # The first item is fetched from now on, so that the data pipeline starts while the model loads.
        batches = FirstAhead(feed(start))
        engine = build_engine(
            w.cfg,
            total_steps=optimizer_steps,
            use_gpu=w.use_gpu,
            zero_stage=zero_stage,
            adapter=os.path.join(ckpt, CHECKPOINT_ADAPTER) if ckpt else None,
            reference_adapter=reference_adapter,
        )
        if ckpt:
            engine.load(ckpt)
    if w.rank == 0:
        w.run.truncate_metrics(keep_through=start)
    return state, start, batches, engine


def nonfinite_skips(w: Worker, engine: Engine, state: dict[str, Any]) -> Skips | None:
    """`train.on_nonfinite: skip`: the engine drops an optimizer step whose loss or gradient is not a number, and
    the run counts such steps (the total carried in the checkpoint's state). None under `fail`."""
    if w.cfg.train.on_nonfinite != "skip":
        return None
    engine.skip_nonfinite()
    return Skips(w.cfg.train.max_nonfinite_in_a_row, total=int(state.get("nonfinite_skipped", 0)))


def agree_zero_stage(w: Worker) -> int:
    """`choose_zero_stage` on every rank, agreed on by all (a collective; the largest wins: one rank that cannot
    hold the base makes every rank shard it; ranks disagreeing on the stage would hang in the first collective)."""
    device_bytes = device_memory_bytes(w.use_gpu, w.local_world)
    stage, why = choose_zero_stage(w.cfg, w.world, device_bytes, base_model_bytes(w.cfg))
    agreed = torch.tensor([stage], dtype=torch.int64, device=w.device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    if int(agreed) != stage:
        why = "another rank cannot hold the frozen base: every rank shards it"
    if w.rank == 0:
        threads = "" if w.use_gpu else f", {torch.get_num_threads()} CPU threads per worker"
        say(f"DeepSpeed ZeRO-{int(agreed)}: {why}{threads}")
    return int(agreed)


def agree_failure(w: Worker, failure: str | None) -> None:
    """Every rank raises when any rank found `failure` (a collective): a rank that raised alone would leave the
    others waiting in their next collective until the timeout."""
    flag = torch.tensor([1 if failure else 0], dtype=torch.int64, device=w.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if int(flag):
        raise RuntimeError(failure or "another rank failed (see its log)")


def seed_step(w: Worker, step: int) -> None:
    """Dropout masks (and any sampling in the step) depend on (seed, step, rank) only: a resumed run draws the
    same ones."""
    torch.manual_seed(int(np.random.SeedSequence([w.cfg.train.seed, step, w.rank]).generate_state(1)[0]))


def checkpoint_due(cfg: Config, steps_done: int, total_steps: int) -> bool:
    return steps_done % cfg.train.checkpoint_every == 0 or steps_done == total_steps


def save_checkpoint(engine: Engine, state: dict[str, Any], metrics: dict[str, Any], rank: int) -> None:
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


@contextlib.contextmanager
def _checkpoint_dir(checkpoint: ray.train.Checkpoint | None) -> Iterator[str | None]:
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as d:
        yield d


class FirstAhead:
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

    def __iter__(self) -> FirstAhead:
        return self

    def __next__(self) -> Any:
        if self._thread is None:
            return next(self._it)
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise self._error
        return self._first
