"""The collectives both per-worker loops share, and the one rule for scaling a micro-batch's loss.

Every function here is a collective: every rank must call it, the same number of times and in the same order,
or the ranks wait on each other until the timeout.

- `sum_collective` / `max_collective`: a few numbers over all ranks in one all-reduce (token counts that a
  step's loss divides by, KTO's reference point, "did any rank ...").
- `records_collective`: every rank's records of a step, or of an evaluation, gathered on every rank, in rank
  order; the metrics row and the held-out metrics are computed from them, the same on every rank.
- `evaluation_due`: when a loop evaluates (every `eval.every` steps and after the last one).
- `backward_scale`: what a micro-batch's loss is multiplied by before `engine.backward`, so that DeepSpeed's
  averaging (over `grad_accum` micro-batches and over ranks) leaves the gradient of the step's global mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray.train.torch
import torch
import torch.distributed as dist

from uft_ray.losses import rank_scale


def _reduce(values: Sequence[float], op: Any) -> list[float]:
    # float64 on the collective device: counts stay exact (below 2^53) and sums of losses lose nothing to float32
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=ray.train.torch.get_device())
    dist.all_reduce(t, op=op)
    return t.tolist()


def sum_collective(values: Sequence[float]) -> list[float]:
    """Each value summed over all ranks (one all-reduce)."""
    return _reduce(values, dist.ReduceOp.SUM)


def max_collective(values: Sequence[float]) -> list[float]:
    """Each value's largest over all ranks (one all-reduce)."""
    return _reduce(values, dist.ReduceOp.MAX)


def records_collective(local: Any, world: int) -> list[Any]:
    """Every rank's `local` (any picklable value), in rank order, on every rank (one all-gather)."""
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, local)
    return gathered


def evaluation_due(every: int | None, steps_done: int, total_steps: int) -> bool:
    """Whether the loop evaluates after `steps_done` steps: every `eval.every` steps (0 or None: never) and at
    the end. The baseline before the first step is the loops' own (start 0 only)."""
    return bool(every and steps_done % every == 0) or steps_done == total_steps


def backward_scale(world: int, grad_accum: int, local_count: int = 1, global_count: int = 1) -> float:
    """The factor on a micro-batch's loss before `engine.backward` (uft_ray.losses.rank_scale).

    DeepSpeed divides each micro-batch's loss by `grad_accum` and averages gradients over ranks. A loss that is
    a local mean over `local_count` rows (or tokens) of a step with `global_count` in all is scaled by
    local_count * world * grad_accum / global_count; a loss that is already this micro-batch's share of the
    step's global mean (its sum divided by the global count, as hint_rft's loss is) keeps the default counts,
    and is scaled by world * grad_accum alone. Either way the applied gradient is the global mean's."""
    return rank_scale(local_count, global_count, world, grad_accum)
