"""Which engine the rollout actors generate with: the one rule for `rft.rollout.backend: auto`.

The run decides it once where it opens (`uft_ray.rft.method.HintRft.resolve`, said on the console); the rollout
actors (uft_ray.rft.driver) and the backend pre-check (uft_ray.preflight) read the decided value.
"""

from __future__ import annotations

import importlib.util

from uft_ray.config import Config


def rollout_backend(cfg: Config) -> str:
    """`rft.rollout.backend: auto`: vLLM on GPU where it is installed, transformers `generate` otherwise."""
    backend = cfg.rft.rollout.backend
    if backend != "auto":
        return backend
    if not cfg.train.use_gpu:
        return "hf"
    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
