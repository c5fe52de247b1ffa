"""A worker's batches, shared by every per-worker loop: this rank's planned batches in plan order, the check that
each one is where the plan put it, and right-padding into tensors.

Both loops read their rank's feed (uft_ray.train.feeds) as batches tagged with their plan position (`step`,
`micro`, `slot`); the offline loop a micro-batch at a time, hint_rft a step's prompts at a time (`micro` 0).
Exact resume rests on that order, so every batch is checked against the position the loop expects.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch


def planned_batches(
    shard: Any, start: int, batch_size: int, *, prefetch_batches: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """This rank's batches in plan order; those of steps before `start` (a restarted attempt: the dataset
    restarts from its beginning) skipped, so nothing is trained twice."""
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=prefetch_batches):
        if int(batch["step"][0]) >= start:
            yield batch


def check_plan_position(batch: Mapping[str, np.ndarray], step: int, micro: int, rank: int) -> None:
    """Fail loudly rather than train the wrong rows: `batch` must be micro-batch `micro` of plan step `step`,
    its slots in order."""
    steps, micros, slots = batch["step"], batch["micro"], batch["slot"]
    if not ((steps == step).all() and (micros == micro).all() and (slots == np.arange(len(slots))).all()):
        raise RuntimeError(
            f"rank {rank}: expected plan step {step} micro-batch {micro}, got steps {steps.tolist()} "
            f"micro {micros.tolist()} slots {slots.tolist()}: the data did not arrive in plan order"
        )


def pad_batch(
    seqs: Sequence[Sequence[int] | np.ndarray],
    pad_id: int,
    device: torch.device,
    masks: Mapping[str, Sequence[tuple[int, int]]],
) -> dict[str, torch.Tensor]:
    """Sequences right-padded to the longest one: `input_ids`, `attention_mask`, and one 0/1 mask per entry of
    `masks`, each marking the span [begin, end) of every row (the response a loss scores, a hint, a target).
    Built on the CPU, then moved to `device` once."""
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    out = {name: torch.zeros_like(ids) for name in masks}
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        attention[i, : len(s)] = 1
        for name, spans in masks.items():
            begin, end = spans[i]
            out[name][i, begin:end] = 1
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": attention, **out}.items()}
