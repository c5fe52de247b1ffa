"""hint_rft's own callbacks beside the shared ones (uft_ray.train.hooks): the rollouts of a step, the adapter sync.

`RftHooks` adds them to `TrainHooks`; the driver hands the loop `rft_hooks(hooks)`, so a caller's plain
`TrainHooks` (the shared callbacks only) works for hint_rft too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from uft_ray.train.hooks import TrainHooks

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from uft_ray.config import Config
    from uft_ray.train.engine import Engine


class RftHooks(TrainHooks):
    """No-op callbacks of the hint_rft loop (uft_ray.rft.loop), with the shared ones; every rank calls each."""

    def on_rollouts(self, *, rank: int, step: int, rollouts: list[dict[str, Any]]) -> None:
        """After this rank's rollouts of step `step` (0-based) are scored: one dict per rollout with `row_id`,
        `k`, `revealed`, `prompt_ids` (prompt + hint), `response_ids` and `reward`."""

    def on_adapter_sync(self, *, rank: int, step: int, trainer_digest: str, actor_digests: list[str]) -> None:
        """After the adapter of step `step` (0: the initial one) reached the rollout actors (rank 0's digests)."""


def rft_hooks(hooks: TrainHooks | None) -> RftHooks:
    """`hooks` as the hint_rft loop calls them: an `RftHooks` as it is, any other `TrainHooks` with the hint_rft
    callbacks it has of its own (else none)."""
    if isinstance(hooks, RftHooks):
        return hooks
    return _Shared(hooks or TrainHooks())


class _Shared(RftHooks):
    """A caller's `TrainHooks` in the hint_rft loop: every callback it has goes to it."""

    def __init__(self, inner: TrainHooks) -> None:
        self.inner = inner

    def on_start(self, engine: Engine, *, rank: int, start_step: int) -> None:
        self.inner.on_start(engine, rank=rank, start_step=start_step)

    def on_micro_batch(self, **kwargs: Any) -> None:
        self.inner.on_micro_batch(**kwargs)

    def on_step_end(self, *, rank: int, step: int) -> None:
        self.inner.on_step_end(rank=rank, step=step)

    def on_end(self, engine: Engine, *, rank: int, cfg: Config, pad_id: int, device: torch.device) -> None:
        self.inner.on_end(engine, rank=rank, cfg=cfg, pad_id=pad_id, device=device)

    def on_rollouts(self, **kwargs: Any) -> None:
        if (own := getattr(self.inner, "on_rollouts", None)) is not None:
            own(**kwargs)

    def on_adapter_sync(self, **kwargs: Any) -> None:
        if (own := getattr(self.inner, "on_adapter_sync", None)) is not None:
            own(**kwargs)
