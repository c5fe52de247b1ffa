"""A loss or a gradient that is not a number stops the run at the step it appears, on every rank at once.

One NaN (a bad reference value, an fp16 scorer, a learning-rate spike) makes the adapter NaN for good: every later
checkpoint and the final adapter too, while the run exits 0 and the report's plots drop the points. Neither
DeepSpeed's bf16 nor its fp32 path skips such a step. So each rank records, per micro-batch, the loss and every
per-row term its loss reports (`StepWatch.loss`), and after the step's updates one all-reduce decides for all ranks
together (one rank's NaN is every rank's: the next step's gradients are averaged over all of them): a non-finite
loss anywhere, or a non-finite global gradient norm, raises `NonFiniteError` on every rank, naming the step, the
rank, the sources of the rows and the loss term, before the step's metrics line or checkpoint is written. The last
checkpoint is then the last finite adapter.

`train.on_nonfinite: skip` decides before the optimizer takes the step instead (`Engine.skip_nonfinite`: one
all-reduce inside the optimizer's step, the gradients dropped so AdamW's moments never see them; `optimizer_step`
tells it what this rank recorded). The step's rows are consumed, its metrics line says `nonfinite/skipped` with
the non-finite values written as null, and `Skips` fails the run after `train.max_nonfinite_in_a_row` skipped steps
in a row (a NaN that comes back every step is a broken run, not a bad batch).
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
        self.mark = 0  # len(found) at the last optimizer step
        self.skipped = 0  # optimizer steps skipped during this plan step

    def loss(self, micro: int, loss: Any, terms: dict[str, Any], sources: Iterable[Any]) -> None:
        """Record micro-batch `micro`'s loss and its terms (`rows/...` per-row values or scalars by name)."""
        bad = [name.removeprefix("rows/") for name, value in terms.items() if not _finite(value)]
        if bad or not _finite(loss):
            self.found.append({"micro": micro, "terms": bad or ["loss"], "sources": sorted({str(s) for s in sources})})

    def check(self, step: int, rank: int, world: int, grad_norm: float, device: Any) -> str | None:
        """Every rank calls this after the step's updates (a collective); raises NonFiniteError on every rank
        when any rank saw a non-finite loss or the gradient norm is not finite, unless every such optimizer step
        was skipped (`train.on_nonfinite: skip`): then it returns the message (None when all was finite)."""
        flags = torch.tensor([float(bool(self.found)), float(not _finite(grad_norm))], dtype=torch.float64,
                             device=device)  # fmt: skip
        if world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if not flags.any():
            self.found, self.mark = [], 0
            return None
        gathered: list[Any] = [None] * world
        if world > 1:
            dist.all_gather_object(gathered, {"rank": rank, "found": self.found})
        else:
            gathered = [{"rank": rank, "found": self.found}]
        said = message(step, gathered, grad_norm)
        if self.skipped:  # the same count on every rank: the skip was agreed in the optimizer's step
            self.found, self.mark = [], 0
            return said
        raise NonFiniteError(said + _STOPPED)


def optimizer_step(engine: Any, watch: StepWatch) -> None:
    """`engine.step()` after a micro-batch's backward, telling it whether this rank recorded a non-finite loss
    since the last optimizer step (it skips that step under `train.on_nonfinite: skip`)."""
    if engine.step(nonfinite=len(watch.found) > watch.mark):
        watch.mark = len(watch.found)
        watch.skipped += int(engine.skipped)


class Skips:
    """`train.on_nonfinite: skip`'s count over plan steps: the total (kept in the checkpoint's state) and the run of
    skipped steps in a row, which fails the run at `limit`."""

    def __init__(self, limit: int, total: int = 0) -> None:
        self.limit, self.total, self.in_a_row = limit, total, 0

    def after(self, row: dict[str, Any], skipped: int, said: str | None) -> dict[str, Any]:
        """The step's metrics row with `nonfinite/skipped` (optimizer steps skipped) and `nonfinite/skipped_total`,
        its non-finite numbers as None (JSON null, not NaN); raises NonFiniteError at `limit` in a row."""
        self.total += skipped
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"{said} {self.in_a_row} steps in a row were skipped (train.max_nonfinite_in_a_row: {self.limit})."
                + _STOPPED
            )
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        return {**clean, "nonfinite/skipped": skipped, "nonfinite/skipped_total": self.total}


def message(step: int, gathered: list[dict[str, Any]], grad_norm: float) -> str:
    """`step 3: the loss is not a number on rank 1, micro-batch 0, sources helpsteer2, term kl; ...`"""
    parts = []
    for g in gathered:
        for f in g["found"]:
            parts.append(f"rank {g['rank']}, micro-batch {f['micro']}, sources {', '.join(f['sources']) or '-'}, "
                         f"term {', '.join(f['terms'])}")  # fmt: skip
    what = ("the loss is not a number on " + "; ".join(parts)) if parts else "the loss is finite on every rank"
    return f"step {step + 1}: {what}; gradient norm {grad_norm}."


_STOPPED = (
    " Stopped before this step's checkpoint and metrics: the last checkpoint holds the last finite adapter. Look at "
    "what feeds that term (the reference log-probs of those rows, the learning rate, the dtype)."
)
