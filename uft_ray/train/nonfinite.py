"""A loss or a gradient that is not a number stops the run at the step it appears, on every rank at once.

One NaN (a bad reference value, an fp16 scorer, a learning-rate spike) makes the adapter NaN for good: every later
checkpoint and the final adapter too, while the run exits 0 and the report's plots drop the points. Neither
DeepSpeed's bf16 nor its fp32 path skips such a step. So each rank records, per micro-batch, the loss and every
per-row term its loss reports (`StepWatch.loss`), and after the step's updates one all-reduce decides for all ranks
together (one rank's NaN is every rank's: the next step's gradients are averaged over all of them): a non-finite
loss anywhere, or a non-finite global gradient norm, raises `NonFiniteError` on every rank, naming the step, the
rank, the sources of the rows and the loss term, before the step's metrics line or checkpoint is written. The last
checkpoint is then the last finite adapter.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist


class NonFiniteError(RuntimeError):
    """A step's loss or gradient norm is NaN or infinite (the same error on every rank)."""


def _finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value.detach()).all())
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True  # not a number at all (a label): nothing to check


class StepWatch:
    """What one rank saw that is not a number during one optimizer step."""

    def __init__(self) -> None:
        self.found: list[dict[str, Any]] = []

    def loss(self, micro: int, loss: Any, terms: dict[str, Any], sources: Iterable[Any]) -> None:
        """Record micro-batch `micro`'s loss and its terms (`rows/...` per-row values or scalars by name)."""
        bad = [name.removeprefix("rows/") for name, value in terms.items() if not _finite(value)]
        if bad or not _finite(loss):
            self.found.append({"micro": micro, "terms": bad or ["loss"], "sources": sorted({str(s) for s in sources})})

    def check(self, step: int, rank: int, world: int, grad_norm: float, device: Any) -> None:
        """Every rank calls this after the step's updates (a collective); raises NonFiniteError on every rank
        when any rank saw a non-finite loss or the gradient norm is not finite."""
        flags = torch.tensor([float(bool(self.found)), float(not _finite(grad_norm))], dtype=torch.float64,
                             device=device)  # fmt: skip
        if world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if not flags.any():
            self.found = []
            return
        gathered: list[Any] = [None] * world
        if world > 1:
            dist.all_gather_object(gathered, {"rank": rank, "found": self.found})
        else:
            gathered = [{"rank": rank, "found": self.found}]
        raise NonFiniteError(message(step, gathered, grad_norm))


def message(step: int, gathered: list[dict[str, Any]], grad_norm: float) -> str:
    """`step 3 (1-based): the loss is not a number on rank 1, micro-batch 0, sources helpsteer2, term kl; ...`"""
    parts = []
    for g in gathered:
        for f in g["found"]:
            parts.append(f"rank {g['rank']}, micro-batch {f['micro']}, sources {', '.join(f['sources']) or '-'}, "
                         f"term {', '.join(f['terms'])}")  # fmt: skip
    what = ("the loss is not a number on " + "; ".join(parts)) if parts else "the loss is finite on every rank"
    return (
        f"step {step + 1}: {what}; gradient norm {grad_norm}. Stopped before this step's checkpoint and metrics: the "
        "last checkpoint holds the last finite adapter. Look at what feeds that term (the reference log-probs of "
        "those rows, the learning rate, the dtype)."
    )
