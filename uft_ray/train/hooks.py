"""Callbacks the worker loop makes on every rank, in the spirit of Hugging Face's `TrainerCallback`.

The production loop calls a `TrainHooks()` whose methods do nothing. A caller that wants to observe or steer
the loop (the integration tests record consumed rows and parameter digests, stop after a step, or park a
worker for a test to kill; tests/fixtures/recorder.py) passes a subclass to `uft_ray.driver.run(cfg,
hooks=...)`; it travels to the workers with the loop's config, so it must be picklable (Ray's cloudpickle).
Hooks observe: they never change what is trained. A method's own callbacks live with the method
(uft_ray.rft.hooks: hint_rft's rollouts and adapter sync).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from uft_ray.config import Config
    from uft_ray.train.engine import Engine


class TrainHooks:
    """No-op callbacks; override the ones you need. Every rank calls each one (collectives are allowed)."""

    def on_start(self, engine: Engine, *, rank: int, start_step: int) -> None:
        """After the engine is built (and restored, on resume), before the first step of this attempt."""

    def on_micro_batch(self, *, rank: int, step: int, micro: int, batch: dict[str, np.ndarray]) -> None:
        """After each micro-batch's backward and step (`step` 0-based, as in the plan)."""

    def on_step_end(self, *, rank: int, step: int) -> None:
        """After optimizer step `step` (1-based, as in metrics.jsonl) is logged and checkpointed."""

    def on_end(self, engine: Engine, *, rank: int, cfg: Config, pad_id: int, device: torch.device) -> None:
        """After the last step."""
